"""`python -m globloc_ros.listen OUT.jsonl`: what a running node publishes, as JSON lines (for `make demo`).

One line per message, flushed as it comes: {"ready": true} once the node's pose topic has a publisher,
{"stamp_ns": image stamp, "t": time.monotonic() at receipt, "T_map_cam": 16 floats, row-major} per pose,
{"diagnostics": {key: value}} per status of the node's diagnostics. Runs until SIGINT or SIGTERM. The demo
(globloc.demo) reads the file, so that the offline package never imports rclpy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.executors import ExternalShutdownException
from rclpy.qos import QoSProfile, ReliabilityPolicy

from globloc_ros import frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='globloc_ros.listen', description=__doc__.splitlines()[0])
    parser.add_argument('out', help='JSON lines file to write')
    parser.add_argument('--namespace', default='/globloc', help="the node's topic namespace (default /globloc)")
    args = parser.parse_args(argv)
    rclpy.init()  # its handlers turn SIGINT and SIGTERM into a shutdown
    node = rclpy.create_node('globloc_listen')
    pose_topic = f'{args.namespace}/pose'
    with open(args.out, 'w') as out:
        def write(record: dict) -> None:
            out.write(json.dumps(record) + '\n')
            out.flush()

        def on_pose(msg: PoseStamped) -> None:
            p, q = msg.pose.position, msg.pose.orientation
            T = frames.pose_from_xyz_quat([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])
            write({'stamp_ns': msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec, 't': time.monotonic(),
                   'T_map_cam': T.ravel().tolist()})

        def on_diagnostics(msg: DiagnosticArray) -> None:
            for status in msg.status:
                if 'globloc' in status.name:
                    write({'diagnostics': {kv.key: kv.value for kv in status.values}})

        node.create_subscription(PoseStamped, pose_topic, on_pose,
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
        ready = False
        try:
            while rclpy.ok():
                rclpy.spin_once(node, timeout_sec=0.05)
                if not ready and node.count_publishers(pose_topic) > 0:
                    write({'ready': True})
                    ready = True
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        except Exception:
            if rclpy.ok():
                raise
            # the shutdown came while a call was using the context ('context is invalid'): done
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
