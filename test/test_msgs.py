"""globloc_msgs/msg/PoseGraphEdge, one definition (ros/globloc_msgs/msg/PoseGraphEdge.msg) for three users: the ROS
package that rosidl builds (`make venv`, colcon), the bags `globloc synth` writes (rosbags, globloc/bags.py), and the
bags written before globloc_msgs was a ROS package (test/data/pose_graph_bag, written at commit 5fe5d83)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.rosbag2 import Reader
from rosbags.typesys import get_types_from_msg

from globloc.bags import EDGE_MSGTYPE, Topics, read_sequence
from globloc_ros import frames as fr

REPO = Path(__file__).resolve().parents[1]
MSG_FILE = REPO / 'ros' / 'globloc_msgs' / 'msg' / 'PoseGraphEdge.msg'
OLD_BAG = REPO / 'test' / 'data' / 'pose_graph_bag'
BIN = Path(sys.executable).parent
NEED_MSGS = 'globloc_msgs is built into the venv by `make venv` (with the rosidl generators of ../shared/ros-overlay)'


def _fields(msgdef: str) -> tuple:
    """The field list of a PoseGraphEdge definition as rosbags parses it (comments and layout aside)."""
    return get_types_from_msg(msgdef, EDGE_MSGTYPE)[EDGE_MSGTYPE]


def _bag_type_hash(bag: Path) -> str:
    meta = yaml.safe_load((bag / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    hashes = {t['topic_metadata']['name']: t['topic_metadata']['type_description_hash']
              for t in meta['topics_with_message_count']}
    return hashes[Topics.graph]


def _edge_key(seq_i, stamp_i_ns, seq_j, stamp_j_ns) -> tuple:
    return int(seq_i), int(stamp_i_ns), int(seq_j), int(stamp_j_ns)


def test_synth_writes_bags_with_the_definition_of_globloc_msgs(tiny_scene):
    with Reader(tiny_scene / 'seq_00') as reader:
        conn = next(c for c in reader.connections if c.topic == Topics.graph)
        assert conn.msgtype == EDGE_MSGTYPE
        written = conn.msgdef.data.split('\n====')[0]  # the message's own part; its dependencies follow
        n = sum(1 for _ in reader.messages(connections=[conn]))
    assert n > 0
    assert _fields(written) == _fields(MSG_FILE.read_text())


def test_a_bag_written_before_still_reads():
    expected = json.loads((OLD_BAG.parent / 'pose_graph_bag.json').read_text())
    seq = read_sequence(OLD_BAG, progress=False)
    assert len(seq.frames) == expected['frames']
    assert len(seq.edges) == len(expected['edges']) and {e['kind'] for e in expected['edges']} == {0, 1}
    for got, want in zip(seq.edges, expected['edges']):
        assert _edge_key(got.seq_i, got.stamp_i_ns, got.seq_j, got.stamp_j_ns) == _edge_key(
            want['seq_i'], want['stamp_i_ns'], want['seq_j'], want['stamp_j_ns'])
        assert got.kind == want['kind']
        np.testing.assert_array_equal(got.T_i_j, np.array(want['T_i_j']))
        np.testing.assert_array_equal(got.covariance.ravel(), np.array(want['covariance']))


def test_bags_carry_the_type_hash_of_the_ros_package(tiny_scene):
    """rosbags records the RIHS01 type hash of what it wrote; rosidl computed the built package's. Equal: `ros2 bag`
    and DDS peers see the bags' edges as the same type as globloc_msgs's (old bags too)."""
    pytest.importorskip('globloc_msgs.msg', reason=NEED_MSGS)
    from ament_index_python.packages import get_package_share_directory
    description = json.loads((Path(get_package_share_directory('globloc_msgs')) / 'msg/PoseGraphEdge.json')
                             .read_text())
    ros_hash = description['type_hashes'][0]
    assert ros_hash['type_name'] == EDGE_MSGTYPE
    assert _bag_type_hash(tiny_scene / 'seq_00') == ros_hash['hash_string']
    assert _bag_type_hash(OLD_BAG) == ros_hash['hash_string']


def test_ros2_interface_show_prints_the_definition():
    """`ros2 interface show globloc_msgs/msg/PoseGraphEdge` as a user types it in the venv: the .msg file as written,
    each field of a message type followed by that type's fields, indented by a tab."""
    pytest.importorskip('globloc_msgs.msg', reason=NEED_MSGS)
    if not (BIN / 'ros2').exists():
        pytest.skip(f'the ros2 CLI is not installed ({BIN / "ros2"})')
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix)
    run = subprocess.run([str(BIN / 'ros2'), 'interface', 'show', EDGE_MSGTYPE], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    shown = run.stdout.splitlines()
    assert [line for line in shown if not line.startswith('\t')] == MSG_FILE.read_text().splitlines()
    i = shown.index('builtin_interfaces/Time stamp_i')
    assert shown[i + 1:i + 3] == ['\tint32 sec', '\tuint32 nanosec']
    i = shown.index('geometry_msgs/Pose relative_pose')
    assert shown[i + 1:i + 3] == ['\tPoint position', '\t\tfloat64 x']
    run = subprocess.run([str(BIN / 'ros2'), 'interface', 'show', 'globloc_msgs/msg/Nope'], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and 'Nope' in run.stderr, run.stdout + run.stderr


def test_rclpy_subscriber_receives_the_edges_that_globloc_replay_publishes(tiny_scene, monkeypatch, tmp_path):
    """globloc-replay publishes a synth bag's /globloc/pose_graph (raw CDR as recorded, typed by the rclpy class of
    globloc_msgs); an rclpy subscription here receives every edge with its values."""
    msgs = pytest.importorskip('globloc_msgs.msg', reason=NEED_MSGS)
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    for key, value in {'ROS_DOMAIN_ID': str(random.SystemRandom().randint(10, 99)), 'ROS_LOG_DIR': str(tmp_path),
                       'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}.items():  # this process and the replay
        monkeypatch.setenv(key, value)
    assert (msgs.PoseGraphEdge.ADJACENT, msgs.PoseGraphEdge.DISTANT) == (0, 1)
    bag = tiny_scene / 'seq_00'
    expected = {_edge_key(e.seq_i, e.stamp_i_ns, e.seq_j, e.stamp_j_ns): e
                for e in read_sequence(bag, progress=False).edges}
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('globloc_msgs_test', context=context)
    received, lock = [], threading.Lock()

    def on_edge(msg):
        with lock:
            received.append(msg)

    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(msgs.PoseGraphEdge, Topics.graph, on_edge, qos)
    node.create_subscription(Image, Topics.image, lambda _: None, qos)  # the replay waits for an image subscriber
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        run = subprocess.run([str(BIN / 'globloc-replay'), str(bag), '--topics', Topics.image, Topics.graph,
                              '--fast'], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f'{Topics.graph} {len(expected)}' in run.stdout, run.stdout
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(received) < len(expected):
            time.sleep(0.05)
    finally:
        executor.shutdown()
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    with lock:
        got = list(received)
    assert len(got) == len(expected), f'{len(got)} of {len(expected)} edges received'
    for msg in got:
        edge = expected[_edge_key(msg.seq_i, msg.stamp_i.sec * 10**9 + msg.stamp_i.nanosec,
                                  msg.seq_j, msg.stamp_j.sec * 10**9 + msg.stamp_j.nanosec)]
        assert msg.kind == edge.kind
        p, q = msg.relative_pose.position, msg.relative_pose.orientation
        np.testing.assert_allclose(fr.pose_from_xyz_quat([p.x, p.y, p.z], [q.x, q.y, q.z, q.w]), edge.T_i_j,
                                   atol=1e-12)
        np.testing.assert_array_equal(np.array(msg.covariance), edge.covariance.ravel())
