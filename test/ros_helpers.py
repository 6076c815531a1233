"""What the ROS tests (test_node.py, test_launch.py, test_colcon.py) share besides conftest's fixtures: this
process's rclpy peer (publishes frames and TF, records what the node publishes), the messages it builds, and the
helpers that stop a child process group and look at its children. conftest's `peer` fixture makes the Peer.

Needs rclpy and tf2_ros (the ROS overlay): a test module importing this is skipped without them."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
tf2_ros = pytest.importorskip('tf2_ros', reason='tf2_ros comes from the ROS overlay (shared/ros-overlay)')

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from nav_msgs.msg import Path as PathMsg  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.time import Time  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

DEPTH_TOPIC = '/camera/depth/image_raw'


class Peer:
    """This process's rclpy node: publishes frames and TF, records poses, initialposes and diagnostics."""

    def __init__(self, namespace: str = '/globloc'):
        self.node = rclpy.create_node('globloc_test_peer')
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_image = self.node.create_publisher(Image, '/camera/image_raw', reliable)
        self.pub_compressed = self.node.create_publisher(CompressedImage, '/camera/image_raw/compressed', reliable)
        self.pub_info = self.node.create_publisher(CameraInfo, '/camera/camera_info', reliable)
        self.pub_depth = self.node.create_publisher(Image, DEPTH_TOPIC, reliable)
        self.lock = threading.Lock()
        self.poses: dict[int, PoseStamped] = {}
        self.poses_cov: dict[int, PoseWithCovarianceStamped] = {}
        self.initial: list[PoseWithCovarianceStamped] = []
        self.diag: dict[str, str] = {}
        self.diag_level = None
        self.diag_message = ''
        self.n_diag = 0
        self.node.create_subscription(PoseStamped, f'{namespace}/pose', self._on_pose, reliable)
        self.node.create_subscription(PoseWithCovarianceStamped, f'{namespace}/pose_with_covariance',
                                      self._on_pose_cov, reliable)
        self.node.create_subscription(PoseWithCovarianceStamped, '/initialpose', self._on_initial, QoSProfile(
            depth=5, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        self.path = None
        self.node.create_subscription(PathMsg, f'{namespace}/path', self._on_path, reliable)
        self.tf_buffer = tf2_ros.Buffer()
        self.tf_listener = tf2_ros.TransformListener(self.tf_buffer, self.node)
        self.tf_broadcaster = tf2_ros.TransformBroadcaster(self.node)
        self.tf_static = tf2_ros.StaticTransformBroadcaster(self.node)
        self.relocalize = self.node.create_client(Trigger, f'{namespace}/relocalize')
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()

    def reset(self) -> None:
        with self.lock:
            self.poses.clear()
            self.poses_cov.clear()
            self.initial.clear()
            self.diag, self.n_diag = {}, 0

    # callbacks (executor thread)
    def _on_pose(self, msg):
        with self.lock:
            self.poses[ns_of(msg.header.stamp)] = msg

    def _on_pose_cov(self, msg):
        with self.lock:
            self.poses_cov[ns_of(msg.header.stamp)] = msg

    def _on_initial(self, msg):
        with self.lock:
            self.initial.append(msg)

    def _on_path(self, msg):
        with self.lock:
            self.path = msg

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name == 'globloc: localizer':
                with self.lock:
                    self.diag = {kv.key: kv.value for kv in status.values}
                    self.diag_level, self.diag_message = status.level, status.message
                    self.n_diag += 1

    # helpers (test thread)
    def count(self, key: str) -> int:
        with self.lock:
            return int(self.diag.get(key, 0))

    def wait(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return True
            time.sleep(0.01)
        with self.lock:
            return bool(predicate())

    def fresh_diag(self, timeout: float = 5.0) -> dict:
        """The next diagnostics message's values (so counters include everything sent before the call)."""
        n = self.n_diag
        assert self.wait(lambda: self.n_diag >= n + 2, timeout), 'no /diagnostics from the node'
        with self.lock:
            return dict(self.diag)

    def send(self, frame, *, stamp_ns: int | None = None, image=None, info=None, compressed: bool = False,
             jpeg: bytes | None = None, frame_id: str | None = None) -> int:
        """Publish CameraInfo (unless info is False) then the image of `frame`; returns the stamp used."""
        stamp_ns = frame.stamp_ns if stamp_ns is None else stamp_ns
        frame_id = frame.frame_id if frame_id is None else frame_id
        stamp = Time(nanoseconds=stamp_ns).to_msg()
        if info is not False:
            msg = info if info is not None else camera_info_msg(frame.K, frame.image.shape[1], frame.image.shape[0])
            msg.header.stamp, msg.header.frame_id = stamp, frame_id
            self.pub_info.publish(msg)
        if compressed:
            msg = CompressedImage(format='jpeg', data=jpeg if jpeg is not None else encode_jpeg(frame.image))
        else:
            msg = image if image is not None else image_msg(frame.image)
        msg.header.stamp, msg.header.frame_id = stamp, frame_id
        (self.pub_compressed if compressed else self.pub_image).publish(msg)
        return stamp_ns


def ns_of(stamp) -> int:
    """A message's builtin_interfaces/Time -> integer nanoseconds."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def image_msg(rgb: np.ndarray, encoding: str = 'rgb8') -> Image:
    h, w = rgb.shape[:2]
    return Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 3,
                 data=np.ascontiguousarray(rgb).tobytes())


def camera_info_msg(K: np.ndarray, w: int, h: int) -> CameraInfo:
    return CameraInfo(width=w, height=h, k=np.asarray(K, dtype=np.float64).reshape(-1).tolist(),
                      d=[0.0] * 5, distortion_model='plumb_bob')


def encode_jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.jpg', rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


# ------------------------------------------------------------------------------------------------ child processes
def stop_process(proc: subprocess.Popen) -> int:
    """SIGINT, then SIGTERM and SIGKILL to the process group of `proc` (started with start_new_session) until it
    ends, and SIGKILL to whatever it left in that group; its exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig) if sig != signal.SIGINT else proc.send_signal(sig)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever launch left behind in its session
    except ProcessLookupError:
        pass
    return proc.returncode


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cmdline(pid: int) -> list[str]:
    """The command line of process `pid`; [] once it is gone."""
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().decode().split('\0')[:-1]
    except OSError:
        return []
