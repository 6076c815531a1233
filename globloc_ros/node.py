"""The localizer node: camera image + CameraInfo in, map-frame pose (and TF, diagnostics) out.

A thin rclpy shell around globloc_ros.runtime.Localizer (which never imports rclpy):

    subscriptions (executor thread)      worker thread                       outputs
    image / compressed  -> one-slot mailbox -> decode, check, localize -> ~/pose, ~/pose_with_covariance,
    camera_info         -> latest Intrinsics    gate (confident, finite)    ~/path, TF, initialpose
    depth (optional)    -> last 30 by stamp  -> the frame's depth image     /diagnostics (timer, 1 Hz)

Callbacks only store messages, so they never block; the mailbox keeps the newest frame and counts
the ones it replaces as dropped, so memory stays bounded under any input rate. With depth_topic set (an RGB-D
camera), the depth image with the frame's stamp (within depth_tolerance; the worker waits up to depth_wait for it)
replaces the depth head's depth in the alignment; a frame without one, or with a bad one, is localized from the
image alone and counted (frames_without_depth, last_reason_depth). With place_map, each confident pose is refined
against that map (placemap.refine: ICP with the frame's depth, else image features); a refinement it refuses leaves
the one-shot pose. Parameters are
declared in one table (PARAMETERS) and read once at start; an invalid value, a missing tf2_ros or a
missing/corrupt model ends the process with exit code 2 and one line naming the cause.

Outputs (node name `globloc` by default), all stamped with the image's stamp, in map_frame:
- ~/pose (PoseStamped), ~/pose_with_covariance (covariance order x, y, z, roll, pitch, yaw), ~/path
  (the last path_length poses, built only while someone subscribes);
- TF (publish_tf): map -> the image's frame_id, or map -> odom = T_map_cam T_odom_cam^-1 (REP-105);
- ~/map_cloud (PointCloud2, transient local, once at start, with place_map): the map's surface points (else its
  feature points), thinned to MAP_CLOUD_POINTS, for RViz;
- initialpose (relative name, so /initialpose or /<ns>/initialpose as nav2 expects): the next confident
  pose after ~/relocalize (std_srvs/Trigger) or at start (relocalize_on_start); the base_frame pose if set;
- /diagnostics: counters frames_{received,published,dropped,no_camera_info,bad_camera_info,bad_image,
  failed,rejected}, tf_failures, last_reason_<category>, rate_hz, p50/p99 of latency_stamp_to_publish
  (meaningful for live or --restamp'ed stamps), latency_receive_to_publish, processing, localize and
  node_overhead (receive -> publish minus localize), the last residual_m / n_eff / spread_m; with depth_topic:
  frames_with_depth, frames_without_depth, last_reason_depth, the last measured_depth (fraction of cells); with
  place_map: frames by path (frames_refined, frames_tracked, frames_recovered; rejected ones in frames_rejected with
  last_reason_rejected), the last refine_inliers.
A frame is published only when the Localizer calls it confident and the pose is finite and rigid. With a place map,
when the one-shot pose is not verified, the last published pose (moved by odometry, odom_frame -> camera in tf2,
where TF has it; else as it was, for prior_timeout seconds) is a prior to refine from, before global recovery.

    globloc-localizer --ros-args -p model:=model.pt -p publish_tf:=map_to_odom
    ros2 launch globloc_ros localize.launch.py model:=model.pt
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import (Point, Pose, PoseStamped, PoseWithCovariance, PoseWithCovarianceStamped,
                               Quaternion, Transform, TransformStamped, Vector3)
from nav_msgs.msg import Path as PathMsg
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from globloc_ros import frames as fr
from globloc_ros import imgmsg
from globloc_ros.share import share_file

DEFAULT_MODEL = 'globloc_synth.pt'
EXIT_CONFIG = 2  # like argparse / `globloc`: the process could not start as configured
MAP_CLOUD_POINTS = 200_000  # ~/map_cloud is thinned to this many points (2.4 MB)


@dataclass(frozen=True)
class Param:
    """One node parameter: name, default (its type is the parameter's type), description,
    allowed values (choices) or an inclusive numeric range (low, high)."""
    name: str
    default: object
    description: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None


PARAMETERS = (
    Param('model', '', 'model file (.pt, .onnx, TensorRT engine); empty: share/globloc_ros/models/'
          + DEFAULT_MODEL),
    Param('backend', 'auto', 'inference backend', ('auto', 'tensorrt', 'onnxruntime', 'torch')),
    Param('device', 'auto', 'inference device; auto: CUDA when present', ('auto', 'cpu', 'cuda')),
    Param('precision', 'auto', 'inference precision; auto: fp16 for torch on CUDA and engines as built, '
          'else fp32', ('auto', 'fp32', 'fp16')),
    Param('threads', 0, 'CPU threads for inference; 0: the backend default', low=0, high=1024),
    Param('image_topic', '/camera/image_raw', 'sensor_msgs/Image topic (the encodings cv_bridge converts to rgb8: '
          'rgb8, bgr8, rgba8, bgra8, mono8, mono16, yuv422, bayer_*, ...)'),
    Param('compressed_topic', '/camera/image_raw/compressed', 'sensor_msgs/CompressedImage topic (jpeg, png)'),
    Param('camera_info_topic', '/camera/camera_info', 'sensor_msgs/CameraInfo topic, per frame or latched '
          '(transient local, published once); the latest one is used'),
    Param('image_transport', 'raw', 'which image topic to subscribe', ('raw', 'compressed')),
    Param('depth_topic', '', 'RGB-D: sensor_msgs/Image depth registered to the colour image (same size and stamps; '
          '32FC1 m or 16UC1 mm; a name ending in /compressedDepth: compressed_depth_image_transport), used in place '
          'of the depth head; empty: the image alone'),
    Param('depth_tolerance', 0.01, 'seconds: the largest stamp difference between an image and its depth image',
          low=0.0, high=1.0),
    Param('depth_wait', 0.05, "seconds to wait for a frame's depth image before localizing without it",
          low=0.0, high=1.0),
    Param('place_map', '', 'map file (`globloc map`): each confident pose is refined against it (ICP with the '
          "frame's depth image, else image features and PnP); empty: the one-shot pose"),
    Param('publish_unverified', False, 'with place_map: also publish a confident one-shot pose that neither '
          'refinement nor recovery verified against the map (default: only poses the map pins)'),
    Param('prior_timeout', 1.0, 'with place_map and no odometry in TF: seconds the last published pose stays a '
          'prior for the next frames (0: never)', low=0.0, high=3600.0),
    Param('map_frame', 'map', 'frame of the published poses'),
    Param('odom_frame', 'odom', 'odometry frame for publish_tf=map_to_odom'),
    Param('base_frame', '', "robot base frame: /initialpose carries the base pose (looked up base->camera "
          "in tf2); empty: the camera pose"),
    Param('publish_tf', 'none', 'TF to broadcast: none, map->camera optical frame, or map->odom (REP-105)',
          ('none', 'map_to_camera', 'map_to_odom')),
    Param('tf_timeout', 0.1, 'seconds to wait for a tf2 lookup (odom->camera, base->camera)', low=0.0, high=10.0),
    Param('max_residual_m', 0.25, 'reject poses whose weighted RMS alignment residual exceeds this (m)',
          low=1e-9, high=1e6),
    Param('min_effective_points', 10.0, 'reject poses with fewer effective points (1 / sum w^2)',
          low=0.0, high=1e9),
    Param('qos', 'sensor_data', 'QoS of the camera subscriptions: sensor_data (best effort) or reliable',
          ('sensor_data', 'reliable')),
    Param('relocalize_on_start', False, 'publish the first confident pose on initialpose'),
    Param('diagnostics_period', 1.0, 'seconds between /diagnostics messages', low=0.01, high=3600.0),
    Param('path_length', 200, 'poses kept in ~/path (0: no path)', low=0, high=1_000_000),
)

# Added to the last published pose's covariance when it is the next frame's prior (motion between frames): 10 cm, 5 deg
PRIOR_COVARIANCE = np.diag([0.1 ** 2] * 3 + [np.radians(5.0) ** 2] * 3)
CATEGORIES = ('dropped', 'no_camera_info', 'bad_camera_info', 'bad_image', 'failed', 'rejected', 'tf')


class ConfigError(RuntimeError):
    """The node cannot start as configured; the message names the parameter or file."""


def _check_param(p: Param, value) -> object:
    """Value of parameter `p` checked against its type, choices and range. Raises ConfigError."""
    kind = type(p.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # `-p max_residual_m:=1` is a fine way to say 1.0
    if type(value) is not kind:
        expected = (f"one of {', '.join(p.choices)}" if p.choices
                    else {int: 'an int', float: 'a float', str: 'a string', bool: 'a bool'}[kind])
        raise ConfigError(f"parameter '{p.name}': expected {expected}, got {value!r} ({type(value).__name__}"
                          + (': yes, no, on, off, true and false read as booleans' if isinstance(value, bool) else '')
                          + ')')
    if p.choices and value not in p.choices:
        raise ConfigError(f"parameter '{p.name}': {value!r} is not one of {', '.join(p.choices)}")
    if p.low is not None and not (p.low <= value <= p.high):
        raise ConfigError(f"parameter '{p.name}': {value!r} is outside [{p.low:g}, {p.high:g}]")
    return value


def _descriptor(p: Param) -> ParameterDescriptor:
    d = ParameterDescriptor(description=p.description, read_only=True, dynamic_typing=True)
    if p.choices:
        d.additional_constraints = 'one of: ' + ', '.join(p.choices)
    elif isinstance(p.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(p.low), to_value=float(p.high))]
    elif isinstance(p.default, int) and not isinstance(p.default, bool) and p.low is not None:
        d.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=1)]
    return d


def default_model_path() -> Path:
    """models/globloc_synth.pt of the installed package, else of the source tree (share.share_file).
    Raises ConfigError if neither exists."""
    path, tried = share_file(f'models/{DEFAULT_MODEL}')
    if path is None:
        raise ConfigError("parameter 'model' is empty and no default model exists (looked for "
                          + ', '.join(map(str, tried)) + '); pass -p model:=<file> or model:=<file> to the launch file')
    return path


class Mailbox:
    """A one-slot mailbox: put() replaces an item not yet taken (counted in `dropped`), get() waits for one."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False
        self.dropped = 0

    def put(self, item) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify()

    def get(self, timeout: float):
        """The newest item, or None after `timeout` seconds or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class StampBuffer:
    """The last `size` stamped messages; find() returns the one nearest a stamp, waiting for it if need be."""

    def __init__(self, size: int = 30):
        self._cond = threading.Condition()
        self._items: deque = deque(maxlen=size)  # (stamp ns, message), in arrival order

    def put(self, msg) -> None:
        with self._cond:
            self._items.append((_stamp_ns(msg.header.stamp), msg))
            self._cond.notify_all()

    def find(self, stamp_ns: int, tolerance_ns: int, timeout: float):
        """The message stamped within tolerance_ns of stamp_ns (the nearest), or None once `timeout` seconds have
        passed or a message stamped after stamp_ns + tolerance_ns has arrived without a match."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                best = min(self._items, key=lambda item: abs(item[0] - stamp_ns), default=None)
                if best is not None and abs(best[0] - stamp_ns) <= tolerance_ns:
                    return best[1]
                left = deadline - time.monotonic()
                if left <= 0 or (self._items and self._items[-1][0] > stamp_ns + tolerance_ns):
                    return None
                self._cond.wait(left)


class Stats:
    """Counters, last reasons and latency windows; written by the worker, read by the diagnostics timer."""

    def __init__(self, window: int = 1000):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.reasons: dict[str, str] = {}
        self.stamp_to_publish_ms: deque = deque(maxlen=window)
        self.receive_to_publish_ms: deque = deque(maxlen=window)
        self.processing_ms: deque = deque(maxlen=window)
        self.localize_ms: deque = deque(maxlen=window)
        self.overhead_ms: deque = deque(maxlen=window)
        self.confident: deque = deque(maxlen=window)
        self.last: dict[str, float] = {}

    def count(self, category: str, reason: str = '') -> None:
        with self.lock:
            self.counts[category] += 1
            if reason:
                self.reasons[category] = reason


def _percentiles(values) -> tuple[float, float]:
    if not values:
        return float('nan'), float('nan')
    p50, p99 = np.percentile(np.fromiter(values, dtype=np.float64), [50, 99])
    return float(p50), float(p99)


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _pose_msg(T: np.ndarray) -> Pose:
    p, q = fr.pose_to_xyz_quat(T)
    return Pose(position=Point(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def _transform_msg(T: np.ndarray) -> Transform:
    p, q = fr.pose_to_xyz_quat(T)
    return Transform(translation=Vector3(x=float(p[0]), y=float(p[1]), z=float(p[2])),
                     rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def cloud_msg(points: np.ndarray, header: Header) -> PointCloud2:
    """(N, 3) metres -> sensor_msgs/PointCloud2 with float32 fields x, y, z (unorganised, little endian)."""
    xyz = np.ascontiguousarray(points, dtype='<f4')
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate('xyz')]
    return PointCloud2(header=header, height=1, width=len(xyz), fields=fields, is_bigendian=False, point_step=12,
                       row_step=12 * len(xyz), data=xyz.tobytes(), is_dense=True)


def transform_to_matrix(tf) -> np.ndarray:
    """geometry_msgs/Transform -> T (4, 4)."""
    t, q = tf.translation, tf.rotation
    return fr.pose_from_xyz_quat([t.x, t.y, t.z], [q.x, q.y, q.z, q.w])


def is_valid_pose(T: np.ndarray, covariance: np.ndarray) -> str:
    """'' if T (4, 4) is a finite rigid transform and covariance (6, 6) finite, else why not."""
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return 'pose is not finite (NaN or inf)'
    R = T[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-3) or abs(np.linalg.det(R) - 1.0) > 1e-3:
        return 'pose rotation is not orthonormal'
    if covariance.shape != (6, 6) or not np.all(np.isfinite(covariance)):
        return 'covariance is not a finite 6x6 matrix'
    return ''


class LocalizerNode(Node):
    """See the module docstring. Raises ConfigError from __init__ when it cannot start."""

    def __init__(self, node_name: str = 'globloc', **kwargs):
        super().__init__(node_name, **kwargs)
        self.cfg = self._read_parameters()
        self.stats = Stats()
        self._mailbox = Mailbox()
        self._camera: tuple[imgmsg.Intrinsics | None, str] = (None, '')
        self._logged_at: dict[str, float] = {}
        self._relocalize = threading.Event()
        self._stop = threading.Event()
        self._path: deque = deque(maxlen=max(1, self.cfg['path_length']))
        self._last_counts: Counter = Counter()
        self._last_diag = time.monotonic()
        self._last_pose = None  # (T_map_cam, covariance, stamp ns, T_odom_cam or None) of the last published pose

        self._tf_buffer = self._tf_broadcaster = None
        if self.cfg['publish_tf'] != 'none' or self.cfg['base_frame']:
            self._setup_tf()
        self.localizer = self._load_localizer()

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_pose = self.create_publisher(PoseStamped, '~/pose', reliable)
        self.pub_pose_cov = self.create_publisher(PoseWithCovarianceStamped, '~/pose_with_covariance', reliable)
        self.pub_path = self.create_publisher(PathMsg, '~/path', reliable)
        # nav2 AMCL subscribes `initialpose` (relative: /initialpose, or /<ns>/initialpose when namespaced).
        # Transient local so a late subscriber that asks for it still gets the last relocalization.
        self.pub_initial = self.create_publisher(
            PoseWithCovarianceStamped, 'initialpose',
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.pub_diag = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        place = self.localizer.place_map
        if place is not None:  # the map, once, for RViz; transient local so a late viewer still gets it
            self.pub_map = self.create_publisher(PointCloud2, '~/map_cloud', QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
            points = place.points if len(place.points) else place.feature_points
            step = max(1, -(-len(points) // MAP_CLOUD_POINTS))  # ceil: at most MAP_CLOUD_POINTS
            self.pub_map.publish(cloud_msg(points[::step], Header(frame_id=self.cfg['map_frame'],
                                                                    stamp=self.get_clock().now().to_msg())))

        if self.cfg['qos'] == 'sensor_data':
            qos = QoSProfile(depth=2, reliability=qos_profile_sensor_data.reliability,
                             durability=qos_profile_sensor_data.durability, history=HistoryPolicy.KEEP_LAST)
        else:
            qos = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        if self.cfg['image_transport'] == 'raw':
            self.image_topic = self.cfg['image_topic']
            self.create_subscription(Image, self.image_topic, self._on_image, qos)
        else:
            self.image_topic = self.cfg['compressed_topic']
            self.create_subscription(CompressedImage, self.image_topic, self._on_image, qos)
        # CameraInfo per frame (volatile: matches any publisher of compatible reliability), and latched once a
        # transient-local publisher shows up (see _subscribe_latched_camera_info).
        self.create_subscription(CameraInfo, self.cfg['camera_info_topic'], self._on_camera_info,
                                 QoSProfile(depth=2, reliability=qos.reliability))
        self._latched_camera_info = None
        self._latched_watch = self.create_timer(0.1, self._subscribe_latched_camera_info)
        self._depths = StampBuffer()
        if self.cfg['depth_topic']:
            # image_transport names a compressed_depth_image_transport topic <base>/compressedDepth
            depth_type = CompressedImage if self.cfg['depth_topic'].endswith('/compressedDepth') else Image
            self.create_subscription(depth_type, self.cfg['depth_topic'], self._depths.put, qos)
        self.create_service(Trigger, '~/relocalize', self._on_relocalize)
        self.create_timer(self.cfg['diagnostics_period'], self._publish_diagnostics)
        if self.cfg['relocalize_on_start']:
            self._relocalize.set()

        self._worker = threading.Thread(target=self._work, name='globloc-worker', daemon=True)
        self._worker.start()
        lz = self.localizer
        self.get_logger().info(
            f'localizing {self.image_topic} + {self.cfg["camera_info_topic"]}'
            + (f' + depth {self.cfg["depth_topic"]}' if self.cfg['depth_topic'] else '')
            + f' with {self.cfg["model"]} '
            + (f'refined against {self.cfg["place_map"]} ' if self.cfg['place_map'] else '')
            + f'({lz.backend}, {lz.device}, {lz.precision}, input {lz.input_size[0]}x{lz.input_size[1]}); '
            f'poses on {self.pub_pose.topic_name}, TF {self.cfg["publish_tf"]}')
        if not self.cfg['place_map']:
            self.get_logger().warning(
                'no place_map: confident one-shot poses go out unverified, and on views away from the recorded '
                'paths some are decimetres off; build a map with `globloc map` and pass place_map:=')

    # ------------------------------------------------------------------------------------- start-up
    def _read_parameters(self) -> dict:
        cfg = {}
        for p in PARAMETERS:
            try:
                value = self.declare_parameter(p.name, p.default, _descriptor(p)).value
            except Exception as e:  # noqa: BLE001 - rclpy raises several types for bad overrides
                raise ConfigError(f"parameter '{p.name}': {e}") from e
            cfg[p.name] = _check_param(p, value)
        for name in ('map_frame', 'odom_frame', 'image_topic', 'compressed_topic', 'camera_info_topic'):
            if not cfg[name].strip():
                raise ConfigError(f"parameter '{name}' must not be empty")
        if cfg['publish_tf'] == 'map_to_odom' and cfg['odom_frame'] == cfg['map_frame']:
            raise ConfigError("parameter 'odom_frame' must differ from 'map_frame' for publish_tf=map_to_odom")
        cfg['model'] = str(default_model_path()) if not cfg['model'] else cfg['model']
        return cfg

    def _setup_tf(self) -> None:
        try:
            # tf2_ros comes from the ROS overlay, not PyPI: import it only when TF is asked for.
            import tf2_ros
        except ImportError as e:
            need = (f"publish_tf={self.cfg['publish_tf']}" if self.cfg['publish_tf'] != 'none'
                    else f"base_frame={self.cfg['base_frame']}")
            raise ConfigError(f'{need} needs tf2_ros, which is not installed ({e}); install the ROS overlay '
                              '(shared/ros-overlay/build.sh) or a ROS 2 distro, or set publish_tf:=none') from e
        if self.cfg['publish_tf'] != 'none':
            self._tf_broadcaster = tf2_ros.TransformBroadcaster(self)
        if self.cfg['publish_tf'] == 'map_to_odom' or self.cfg['base_frame']:
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)

    def _load_localizer(self):
        model = self.cfg['model']
        if not Path(model).exists():
            raise ConfigError(f"parameter 'model': file not found: {model}")
        from globloc_ros.placemap import MapError, load_map
        from globloc_ros.runtime import Localizer, LocalizerError  # torch/onnxruntime: imported after the checks

        try:
            place_map = load_map(self.cfg['place_map']) if self.cfg['place_map'] else None
        except MapError as e:
            raise ConfigError(f"parameter 'place_map': {e}") from e
        try:
            auto = {'auto': None}
            lz = Localizer(model, backend=self.cfg['backend'], device=auto.get(self.cfg['device'], self.cfg['device']),
                           threads=self.cfg['threads'] or None, max_residual_m=self.cfg['max_residual_m'],
                           min_effective_points=self.cfg['min_effective_points'],
                           precision=auto.get(self.cfg['precision'], self.cfg['precision']), place_map=place_map,
                           publish_unverified=self.cfg['publish_unverified'])
        except (LocalizerError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"parameter 'model' ({model}): {e}") from e
        # One warm-up call so the first camera frame is not the one paying for lazy initialisation.
        w, h = lz.input_size
        K = np.array([[w, 0.0, (w - 1) / 2], [0.0, w, (h - 1) / 2], [0.0, 0.0, 1.0]])
        try:
            lz.localize(np.full((h, w, 3), 127, np.uint8), K)
        except Exception as e:  # noqa: BLE001 - a model that cannot run at all should stop here
            raise ConfigError(f"parameter 'model' ({model}): the model fails on a test image: "
                              f'{type(e).__name__}: {e}') from e
        return lz

    # ------------------------------------------------------------------------------------- callbacks
    def _on_image(self, msg) -> None:
        self.stats.count('received')
        self._mailbox.put((msg, time.perf_counter()))

    def _subscribe_latched_camera_info(self) -> None:
        """Timer: once a transient-local ("latched") CameraInfo publisher is discovered, subscribe transient local
        with its reliability too, so the message a driver published once before this node started still arrives.

        Made only then: a transient-local subscription matches no volatile publisher, nor, if reliable, a
        best-effort one (QoS request vs offer), and every such driver would log an incompatible-QoS warning."""
        topic = self.cfg['camera_info_topic']
        for pub in self.get_publishers_info_by_topic(topic):
            if pub.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL:
                self._latched_camera_info = self.create_subscription(
                    CameraInfo, topic, self._on_camera_info,
                    QoSProfile(depth=1, reliability=pub.qos_profile.reliability,
                               durability=DurabilityPolicy.TRANSIENT_LOCAL))
                self._latched_watch.cancel()
                return

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            cam = imgmsg.Intrinsics.from_camera_info(msg)
        except ValueError as e:
            self._camera = (None, str(e))
            return
        old = self._camera[0]
        if not cam.same_as(old):
            self._camera = (cam, '')  # a new object only when the camera changed: keeps undistortion maps

    def _on_relocalize(self, _request, response):
        self._last_pose = None  # the robot may have been carried off: no prior, global recovery
        self._relocalize.set()
        response.success = True
        response.message = (f'the next confident pose goes to {self.pub_initial.topic_name}'
                            + (f' as the pose of {self.cfg["base_frame"]}' if self.cfg['base_frame'] else ''))
        return response

    # ------------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._mailbox.get(timeout=0.2)
            if item is None:
                continue
            try:
                self._process(*item)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything one frame does
                self._reject('failed', f'{type(e).__name__}: {e}')

    def _reject(self, category: str, reason: str) -> None:
        """Count a problem (a frame that published nothing, a TF that could not be published, a frame without
        its depth) with its reason, shown in /diagnostics; log it at most every 5 s per category."""
        self.stats.count(category, reason)
        now = time.monotonic()
        if now - self._logged_at.get(category, -1e9) >= 5.0:
            self._logged_at[category] = now
            log = self.get_logger().error if category == 'failed' else self.get_logger().warning
            log(f'{category.replace("_", " ")}: {reason}')

    def _process(self, msg, t_received: float) -> None:
        t0 = time.perf_counter()
        cam, cam_error = self._camera
        if cam is None:
            if cam_error:
                return self._reject('bad_camera_info', cam_error)
            return self._reject('no_camera_info', f'no CameraInfo on {self.cfg["camera_info_topic"]} yet')
        try:
            rgb = imgmsg.to_rgb(msg)
            imgmsg.check_size(rgb, cam)
            rgb = cam.rectify(rgb)
        except ValueError as e:
            return self._reject('bad_image', str(e))
        depth = self._depth_for(msg.header.stamp, cam) if self.cfg['depth_topic'] else None
        t_decoded = time.perf_counter()
        try:
            result = self.localizer.localize(rgb, cam.K, depth, prior=self._prior_for(msg.header))
        except ValueError as e:
            return self._reject('bad_image', f'localizer: {e}')
        t_localized = time.perf_counter()
        T = np.asarray(result.T_map_cam, dtype=np.float64)
        cov = np.asarray(result.covariance, dtype=np.float64)
        with self.stats.lock:
            self.stats.last = {'residual_m': float(result.residual), 'n_eff': float(result.n_eff),
                               'spread_m': float(result.spread)}
            if self.cfg['depth_topic']:
                self.stats.last['measured_depth'] = result.measured_depth
            if result.refinement is not None:
                self.stats.last['refine_inliers'] = result.refinement.inlier_fraction
            self.stats.confident.append(bool(result.confident))
        if not result.confident:
            return self._reject('rejected', result.reason or 'not confident')
        invalid = is_valid_pose(T, cov)  # the Localizer checks this too; a NaN pose must never leave the node
        if invalid:
            return self._reject('rejected', invalid)
        if self.localizer.place_map is not None:
            self.stats.count(result.path)
        self._publish(msg.header, T, cov)
        self._last_pose = (T, cov, _stamp_ns(msg.header.stamp), self._odom_cam(msg.header))
        t1 = time.perf_counter()
        age_ms = (self.get_clock().now().nanoseconds - _stamp_ns(msg.header.stamp)) / 1e6
        with self.stats.lock:
            self.stats.counts['published'] += 1
            self.stats.processing_ms.append((t1 - t0) * 1e3)
            self.stats.receive_to_publish_ms.append((t1 - t_received) * 1e3)
            self.stats.localize_ms.append((t_localized - t_decoded) * 1e3)
            # What the node adds to the Localizer between receiving the image and publishing the pose.
            self.stats.overhead_ms.append((t1 - t_received - (t_localized - t_decoded)) * 1e3)
            self.stats.stamp_to_publish_ms.append(age_ms)

    def _depth_for(self, stamp, cam: imgmsg.Intrinsics) -> np.ndarray | None:
        """The depth image (H, W) metres, NaN = none, rectified like the colour image, stamped with `stamp`;
        None (counted, with the reason) when there is none or it is unusable."""
        topic = self.cfg['depth_topic']
        msg = self._depths.find(_stamp_ns(stamp), round(self.cfg['depth_tolerance'] * 1e9), self.cfg['depth_wait'])
        if msg is None:
            self._reject('without_depth', f'no depth image on {topic} within {self.cfg["depth_tolerance"]:g} s of '
                                          f'the image stamp {stamp.sec}.{stamp.nanosec:09d}')
            return None
        try:
            depth = imgmsg.depth_to_metres(msg)
            if depth.shape[::-1] != cam.size:
                raise ValueError(f'depth image is {depth.shape[1]}x{depth.shape[0]} but CameraInfo.width/height '
                                 f'says {cam.size[0]}x{cam.size[1]} (register the depth to the colour camera)')
        except ValueError as e:
            self._reject('without_depth', f'{topic}: {e}')
            return None
        self.stats.count('with_depth')
        return cam.rectify(depth, nearest=True)

    def _publish(self, image_header, T: np.ndarray, cov: np.ndarray) -> None:
        header = Header(stamp=image_header.stamp, frame_id=self.cfg['map_frame'])
        pose = _pose_msg(T)
        stamped = PoseStamped(header=header, pose=pose)
        self.pub_pose.publish(stamped)
        with_cov = PoseWithCovarianceStamped(
            header=header, pose=PoseWithCovariance(pose=pose, covariance=cov.reshape(-1)))
        self.pub_pose_cov.publish(with_cov)
        if self.cfg['path_length'] > 0:
            self._path.append(stamped)
            if self.pub_path.get_subscription_count() > 0:  # a 200-pose Path is only built for a listener
                self.pub_path.publish(PathMsg(header=header, poses=list(self._path)))
        camera_frame = image_header.frame_id
        if self._tf_broadcaster is not None:
            self._publish_tf(header, camera_frame, T)
        if self._relocalize.is_set():
            self._publish_initial_pose(header, camera_frame, T, cov)

    def _odom_cam(self, header: Header) -> np.ndarray | None:
        """T_odom_cam (4, 4) at the image stamp, where tf2 runs (publish_tf map_to_odom or base_frame) and has it."""
        if self._tf_buffer is None or not header.frame_id:
            return None
        try:
            return self._lookup(self.cfg['odom_frame'], header.frame_id, header.stamp)
        except Exception:  # noqa: BLE001 - no odometry: the prior falls back to the last pose as it was
            return None

    def _prior_for(self, header: Header) -> tuple[np.ndarray, np.ndarray] | None:
        """(T_map_cam, covariance) expected for this frame from the last published pose: moved by odometry when
        tf2 has odom -> camera at both stamps, else as it was if at most prior_timeout s old; None otherwise."""
        if self._last_pose is None or self.localizer.place_map is None:
            return None
        T, cov, stamp_ns, T_odom_cam_then = self._last_pose
        if T_odom_cam_then is not None and (T_odom_cam := self._odom_cam(header)) is not None:
            return T @ fr.invert_pose(T_odom_cam_then) @ T_odom_cam, cov + PRIOR_COVARIANCE
        age_s = (_stamp_ns(header.stamp) - stamp_ns) / 1e9
        if 0 <= age_s <= self.cfg['prior_timeout']:
            return T, cov + PRIOR_COVARIANCE
        return None

    def _lookup(self, target: str, source: str, stamp) -> np.ndarray:
        """T_target_source (4, 4) from tf2 at the image stamp, waiting at most tf_timeout. Raises on failure."""
        tf = self._tf_buffer.lookup_transform(target, source, Time.from_msg(stamp),
                                              timeout=Duration(seconds=self.cfg['tf_timeout']))
        return transform_to_matrix(tf.transform)

    def _publish_tf(self, header: Header, camera_frame: str, T_map_cam: np.ndarray) -> None:
        if not camera_frame:
            return self._reject('tf', 'image header.frame_id is empty: no camera frame for TF')
        if self.cfg['publish_tf'] == 'map_to_camera':
            child, T = camera_frame, T_map_cam
        else:  # REP-105: map->odom = T_map_cam * T_odom_cam^-1, so that map->odom->...->camera = T_map_cam
            try:
                T_odom_cam = self._lookup(self.cfg['odom_frame'], camera_frame, header.stamp)
            except Exception as e:  # noqa: BLE001 - tf2 raises LookupException, ExtrapolationException, ...
                self._reject('tf', f'{self.cfg["odom_frame"]} -> {camera_frame}: {type(e).__name__}: {e}')
                return
            child, T = self.cfg['odom_frame'], T_map_cam @ fr.invert_pose(T_odom_cam)
        self._tf_broadcaster.sendTransform(TransformStamped(header=header, child_frame_id=child,
                                                            transform=_transform_msg(T)))

    def _publish_initial_pose(self, header: Header, camera_frame: str, T_map_cam: np.ndarray,
                              cov: np.ndarray) -> None:
        T = T_map_cam
        if self.cfg['base_frame']:
            try:
                T = T_map_cam @ fr.invert_pose(self._lookup(self.cfg['base_frame'], camera_frame, header.stamp))
            except Exception as e:  # noqa: BLE001
                self._reject('tf', f'{self.cfg["base_frame"]} -> {camera_frame}: {type(e).__name__}: {e}')
                return  # stays pending: the next confident pose tries again
        # The camera covariance is kept for the base pose: a fixed mount changes it little, and AMCL only
        # uses it to spread its initial particles.
        self.pub_initial.publish(PoseWithCovarianceStamped(
            header=header, pose=PoseWithCovariance(pose=_pose_msg(T), covariance=cov.reshape(-1))))
        self._relocalize.clear()
        self.get_logger().info(f'published the relocalized pose on {self.pub_initial.topic_name}')

    # ------------------------------------------------------------------------------------- diagnostics
    def diagnostics(self) -> DiagnosticStatus:
        """The node's health as one DiagnosticStatus (values are strings, keys snake_case)."""
        s, now = self.stats, time.monotonic()
        with s.lock:
            counts = Counter(s.counts)
            counts['dropped'] = self._mailbox.dropped
            reasons = dict(s.reasons)
            period = max(now - self._last_diag, 1e-3)
            lat = _percentiles(s.stamp_to_publish_ms)
            rtp = _percentiles(s.receive_to_publish_ms)
            proc = _percentiles(s.processing_ms)
            loc = _percentiles(s.localize_ms)
            over = _percentiles(s.overhead_ms)
            conf = float(np.mean(s.confident)) if s.confident else float('nan')
            last = dict(s.last)
        new = counts - self._last_counts
        rate = new['published'] / period
        self._last_counts, self._last_diag = counts, now
        lz = self.localizer
        values = {
            'frames_received': counts['received'], 'frames_published': counts['published'],
            **{f'frames_{c}': counts[c] for c in CATEGORIES if c != 'tf'}, 'tf_failures': counts['tf'],
            'rate_hz': f'{rate:.2f}',
            'latency_stamp_to_publish_p50_ms': f'{lat[0]:.2f}', 'latency_stamp_to_publish_p99_ms': f'{lat[1]:.2f}',
            'latency_receive_to_publish_p50_ms': f'{rtp[0]:.2f}',
            'latency_receive_to_publish_p99_ms': f'{rtp[1]:.2f}',
            'processing_p50_ms': f'{proc[0]:.2f}', 'processing_p99_ms': f'{proc[1]:.2f}',
            'localize_p50_ms': f'{loc[0]:.2f}', 'localize_p99_ms': f'{loc[1]:.2f}',
            'node_overhead_p50_ms': f'{over[0]:.2f}', 'node_overhead_p99_ms': f'{over[1]:.2f}',
            'confident_fraction': f'{conf:.3f}',
            **({'frames_with_depth': counts['with_depth'], 'frames_without_depth': counts['without_depth'],
                'last_reason_depth': reasons.get('without_depth', '')} if self.cfg['depth_topic'] else {}),
            **({f'frames_{p}': counts[p] for p in ('refined', 'tracked', 'recovered')} if self.cfg['place_map']
               else {}),
            **{k: f'{v:.4g}' for k, v in last.items()},
            **{f'last_reason_{c}': reasons.get(c, '') for c in CATEGORIES},
            'backend': lz.backend, 'device': lz.device, 'precision': lz.precision,
            'input_size': f'{lz.input_size[0]}x{lz.input_size[1]}', 'model': self.cfg['model'],
            'rss_mb': f'{_rss_mb():.1f}',
        }
        if new['published']:
            level, message = DiagnosticStatus.OK, f'localizing at {rate:.1f} Hz'
        elif not new['received']:
            level, message = DiagnosticStatus.WARN, f'no images on {self.image_topic}'
        else:
            worst = next((c for c in ('failed', 'bad_camera_info', 'no_camera_info', 'bad_image', 'rejected')
                          if new[c]), 'dropped')
            level = DiagnosticStatus.ERROR if worst == 'failed' else DiagnosticStatus.WARN
            message = f'no pose published: {worst.replace("_", " ")}: {reasons.get(worst, "")}'
        return DiagnosticStatus(level=level, name=f'{self.get_name()}: localizer', message=message,
                                hardware_id=Path(self.cfg['model']).name,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    def _publish_diagnostics(self) -> None:
        self.pub_diag.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()),
                                              status=[self.diagnostics()]))

    def shutdown(self) -> None:
        """Stop the worker (it finishes the frame it is on)."""
        self._stop.set()
        self._mailbox.close()
        self._worker.join(timeout=5.0)


def _rss_mb() -> float:
    """Resident memory of this process in MiB (Linux), NaN elsewhere."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    except (OSError, ValueError, IndexError):
        return float('nan')


def main(args: list[str] | None = None) -> None:
    faulthandler.enable()  # a crash in native code (DDS, onnxruntime) leaves the Python stack in the log
    rclpy.init(args=args)
    try:
        node = LocalizerNode()
    except ConfigError as e:
        print(f'globloc localizer: error: {e}', file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        sys.exit(EXIT_CONFIG)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if node.context.ok():
            raise
        # Ctrl-C shut the context down while a callback was using it (rcl raises 'context is invalid'): done.
    finally:
        # rclpy's SIGINT handler shuts the context down and then lets Python raise KeyboardInterrupt, which
        # could land anywhere in this cleanup: ignore further SIGINTs (a pending one included) while cleaning up.
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:
            pass
        node.shutdown()
        executor.shutdown()
        # Known upstream race (ros2/rclpy#178, #663): about one Ctrl-C in 15 here ends in a segfault inside
        # destroy_node (rcl's node fini), after the worker has stopped; faulthandler then prints this stack.
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
