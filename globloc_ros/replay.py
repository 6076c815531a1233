"""`globloc-replay`: publish a bag's camera topics over DDS (`ros2 bag play` is not installable here).

    globloc-replay BAG... [--rate R | --rate-hz HZ | --fast] [--topics T ...] [--loop] [--duration S]
                          [--restamp] [--record TOPIC --out FILE.json]

Messages are read raw with rosbags (globloc.bags finds the bags), one at a time as they go out (a recording
of any length plays in bounded memory), and published as the serialized CDR they were recorded as, so no field-by-field conversion can change them; header stamps stay the
recorded ones unless --restamp. Timing follows the bags' log times times 1/R (--rate), or a fixed
image rate (--rate-hz; the other topics, the depth image included, go out with their image), or no waiting at
all (--fast).
Several bags play one after the other, each with its own time base. Before the first message it
waits (bounded, --wait) until every image topic has a subscriber.

--restamp replaces each header stamp by the wall-clock time of publishing (messages that shared a
stamp, such as an image and its CameraInfo, still share the new one), which is what a live camera
does and what latency measurements need. --record TOPIC subscribes a geometry_msgs/PoseStamped topic
(e.g. /globloc/pose) and --out writes what was sent and received, with wall-clock times, as JSON
(the node benchmark, globloc/node_bench.py, reads it).

Fast DDS: unless the environment names a profile, the replay uses config/fastdds_large_data.xml, whose larger
shared-memory segment lets best-effort subscribers (the node's default QoS) receive every image and depth image.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.utilities import remove_ros_args

from globloc_ros.bagfiles import Topics, bag_paths
from globloc_ros.share import share_file

DEFAULT_TOPICS = (Topics.image, Topics.compressed, Topics.camera_info, Topics.depth)  # those the bag has
IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
LARGE_DATA_PROFILE = 'fastdds_large_data.xml'


def message_class(msgtype: str):
    """'sensor_msgs/msg/Image' -> the rclpy message class. Raises ValueError naming the type."""
    pkg, _, name = msgtype.split('/')
    try:
        return getattr(importlib.import_module(f'{pkg}.msg'), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f'message type {msgtype} is not available to rclpy here ({e})') from e


def restamp_cdr(raw: bytes, stamp_ns: int) -> tuple[bytes, int]:
    """Replace header.stamp of a serialized message whose first field is a std_msgs/Header.

    CDR: a 4-byte encapsulation header (byte 1 odd: little endian), then stamp.sec int32 and
    stamp.nanosec uint32. Returns (new bytes, old stamp in ns)."""
    sec, nsec = struct.unpack_from(_stamp_format(raw), raw, 4)
    out = bytearray(raw)
    struct.pack_into(_stamp_format(raw), out, 4, stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000)
    return bytes(out), sec * 1_000_000_000 + nsec


def cdr_stamp(raw: bytes) -> int:
    """header.stamp (ns) of a serialized message whose first field is a std_msgs/Header (no copy)."""
    sec, nsec = struct.unpack_from(_stamp_format(raw), raw, 4)
    return sec * 1_000_000_000 + nsec


def _stamp_format(raw: bytes) -> str:
    return '<iI' if raw[1] & 1 else '>iI'


def bag_topics(path: Path, topics: tuple[str, ...]) -> dict[str, str]:
    """{topic: msgtype} of the chosen topics present in one bag; ValueError naming the bag when none is."""
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    try:
        with Reader(path) as reader:
            present = {c.topic: c.msgtype for c in reader.connections}
    except (ReaderError, OSError, KeyError) as e:
        raise ValueError(f'{path}: not a readable rosbag2 bag ({type(e).__name__}: {e})') from e
    chosen = {t: present[t] for t in topics if t in present}
    if not chosen:
        raise ValueError(f'{path}: none of the topics {", ".join(topics)} is in the bag; topics present: '
                         + ', '.join(f'{t} ({m})' for t, m in sorted(present.items())))
    return chosen


def bag_messages(path: Path, chosen: dict[str, str]) -> Iterator[tuple[str, int, bytes]]:
    """(topic, log time ns, raw CDR) of the chosen topics of one bag in log-time order, read as they are
    published: a recording of any length plays in the memory of a few messages."""
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    try:
        with Reader(path) as reader:
            conns = [c for c in reader.connections if c.topic in chosen]
            for c, t, raw in reader.messages(connections=conns):
                yield c.topic, t, bytes(raw)
    except (ReaderError, OSError, KeyError) as e:
        raise ValueError(f'{path}: not a readable rosbag2 bag ({type(e).__name__}: {e})') from e


class Recorder:
    """Subscribes a PoseStamped topic; keeps (stamp ns, wall-clock receipt ns) per message, and the values
    of the last /diagnostics status whose name starts with the pose topic's node name."""

    def __init__(self, node, topic: str):
        self.received: list[tuple[int, int]] = []
        self.diagnostics: dict[str, str] = {}
        self._node_name = topic.rstrip('/').split('/')[-2] if topic.count('/') >= 2 else ''
        node.create_subscription(PoseStamped, topic, self._on_pose,
                                 QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
        node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)

    def _on_pose(self, msg: PoseStamped) -> None:
        s = msg.header.stamp
        self.received.append((s.sec * 1_000_000_000 + s.nanosec, time.time_ns()))

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if self._node_name and status.name.startswith(self._node_name + ':'):
                self.diagnostics = {kv.key: kv.value for kv in status.values}


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def replay(node, bags: list[Path], topics: tuple[str, ...], rate: float | None, rate_hz: float | None,
           restamp: bool, loop: bool, wait_s: float, qos: QoSProfile, duration_s: float | None = None,
           log=print) -> dict:
    """Publish the bags (see the module docstring); stop after duration_s seconds of publishing if given.
    Returns {'sent': [(stamp ns, wall ns), ...] of images, 'counts': {topic: n}, 'duration_s': seconds
    from the first message to the last}."""
    loaded = [(p, bag_topics(p, topics)) for p in bags]
    pubs, header_first = {}, {}
    for _, chosen in loaded:
        for topic, msgtype in chosen.items():
            if topic not in pubs:
                cls = message_class(msgtype)
                pubs[topic] = node.create_publisher(cls, topic, qos)
                header_first[topic] = next(iter(cls.get_fields_and_field_types()), '') == 'header'
    if restamp and not all(header_first.values()):
        raise ValueError('--restamp needs messages that start with a header; not so for '
                         + ', '.join(t for t, h in header_first.items() if not h))
    # Camera images set the pace; a depth image (also a sensor_msgs/Image) goes out with its colour image.
    image_topics = [t for _, chosen in loaded for t, m in chosen.items() if m in IMAGE_TYPES and t != Topics.depth]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(pubs[t].get_subscription_count() for t in image_topics):
        time.sleep(0.05)
    missing = [t for t in image_topics if not pubs[t].get_subscription_count()]
    if missing:
        log(f'replay: no subscriber on {", ".join(missing)} after {wait_s:g} s; publishing anyway')
    else:
        time.sleep(0.2)  # the subscriber's side of the match can trail the publisher's by a moment

    counts: Counter = Counter()
    sent: list[tuple[int, int]] = []
    new_stamps: dict[int, int] = {}
    start = time.monotonic()
    end = None if duration_s is None else start + duration_s
    while True:
        for path, chosen in loaded:
            t0_log, t0_wall, n_images, last_image_stamp = None, time.monotonic(), 0, None
            new_stamps.clear()  # a new pass (or loop) gets new stamps
            msgs = bag_messages(path, chosen)
            for topic, log_ns, raw in msgs:
                if not rclpy.ok() or (end is not None and time.monotonic() > end):  # SIGINT / SIGTERM / time
                    break
                if t0_log is None:
                    t0_log, t0_wall = log_ns, time.monotonic()
                is_image = topic in image_topics
                if rate is not None:
                    _sleep_until(t0_wall + (log_ns - t0_log) / 1e9 / rate)
                elif rate_hz is not None and (is_image or not header_first[topic]
                                              or cdr_stamp(raw) != last_image_stamp):
                    # Slot = images sent so far: a CameraInfo recorded before its image goes out with it, and a
                    # message with the last image's stamp (its depth image, recorded after it) right after it.
                    _sleep_until(t0_wall + n_images / rate_hz)
                stamp = None
                if restamp:
                    old = cdr_stamp(raw)
                    if old not in new_stamps:
                        if len(new_stamps) > 64:
                            new_stamps.clear()
                        new_stamps[old] = time.time_ns()
                    raw, _ = restamp_cdr(raw, new_stamps[old])
                    stamp = new_stamps[old]
                elif is_image:
                    stamp = cdr_stamp(raw)
                pubs[topic].publish(raw)
                counts[topic] += 1
                if is_image:
                    n_images += 1
                    last_image_stamp = cdr_stamp(raw)
                    sent.append((stamp, time.time_ns()))
            msgs.close()
            if not rclpy.ok() or (end is not None and time.monotonic() > end):
                break
        if not loop or not rclpy.ok() or (end is not None and time.monotonic() > end):
            break
    for pub in pubs.values():
        if rclpy.ok() and qos.reliability == ReliabilityPolicy.RELIABLE:
            pub.wait_for_all_acked(Duration(seconds=2.0))
    return {'sent': sent, 'counts': dict(counts), 'duration_s': time.monotonic() - start}


def use_large_data_profile() -> Path | None:
    """Point Fast DDS at config/fastdds_large_data.xml (a 16 MB shared-memory segment: the default 512 KB drops
    best-effort image + depth samples) unless the environment names a profile or another RMW. Call before
    rclpy.init. Returns the profile used, None when left alone."""
    if os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp') != 'rmw_fastrtps_cpp' or any(
            k in os.environ for k in ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')):
        return None
    path, _ = share_file(f'config/{LARGE_DATA_PROFILE}')
    if path is not None:
        os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bags', nargs='+', type=Path, help='bag folders, .mcap/.db3 files, or folders of bags')
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument('--rate', type=float, default=1.0, help='recorded rate times R (default 1)')
    pace.add_argument('--rate-hz', type=float, default=None, help='a fixed image rate instead of the recorded one')
    pace.add_argument('--fast', action='store_true', help='no waiting between messages')
    parser.add_argument('--topics', nargs='+', default=list(DEFAULT_TOPICS),
                        help="topics to publish (default: those of the data contract's camera topics the bag has: "
                             'image or compressed image, CameraInfo, depth)')
    parser.add_argument('--loop', action='store_true', help='play again until interrupted (or --duration)')
    parser.add_argument('--duration', type=float, default=None, help='stop after this many seconds')
    parser.add_argument('--restamp', action='store_true', help='header stamps = wall-clock time of publishing')
    parser.add_argument('--qos', choices=('reliable', 'sensor_data'), default='reliable')
    parser.add_argument('--wait', type=float, default=5.0, help='seconds to wait for subscribers (default 5)')
    parser.add_argument('--record', default=None, help='PoseStamped topic to record while replaying')
    parser.add_argument('--settle', type=float, default=1.0,
                        help='with --record: seconds to keep listening after the last message')
    parser.add_argument('--out', type=Path, default=None, help='with --record: JSON of sent and received stamps')


def _spin(executor) -> None:
    """The executor's loop, in a thread; its end at Ctrl-C (the context shut down under it) is no error."""
    try:
        executor.spin()
    except ExternalShutdownException:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='globloc-replay', description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(remove_ros_args(['x', *argv])[1:])
    if (args.rate is not None and args.rate <= 0) or (args.rate_hz is not None and args.rate_hz <= 0):
        parser.error('--rate and --rate-hz must be positive')
    try:
        bags = bag_paths(args.bags)
    except Exception as e:  # noqa: BLE001 - BagError / OSError: one line, not a traceback
        parser.exit(2, f'globloc-replay: error: {e}\n')
    use_large_data_profile()
    rclpy.init(args=argv)
    node = rclpy.create_node('globloc_replay')
    recorder = Recorder(node, args.record) if args.record else None
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=_spin, args=(executor,), daemon=True)
    spinner.start()
    qos = qos_profile_sensor_data if args.qos == 'sensor_data' else QoSProfile(
        depth=10, reliability=ReliabilityPolicy.RELIABLE)
    rate = None if (args.fast or args.rate_hz) else args.rate
    code = 0
    try:
        out = replay(node, bags, tuple(args.topics), rate, args.rate_hz, args.restamp, args.loop, args.wait, qos,
                     args.duration)
        duration = out['duration_s']
        if recorder is not None:
            time.sleep(args.settle)
        print(f'replay: {sum(out["counts"].values())} messages in {duration:.2f} s ('
              + ', '.join(f'{t} {n}' for t, n in out['counts'].items()) + ')', flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps({'sent': out['sent'], 'counts': out['counts'], 'duration_s': duration,
                                            'received': list(recorder.received) if recorder else [],
                                            'diagnostics': dict(recorder.diagnostics) if recorder else {}}))
    except ValueError as e:
        print(f'globloc-replay: error: {e}', file=sys.stderr)
        code = 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    sys.exit(code)


if __name__ == '__main__':
    main()
