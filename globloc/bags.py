"""The bag layer: read and write the rosbag2 data contract (METHOD.md section 5), and `globloc info`.

Reading needs no ROS install: `rosbags` deserialises the messages (types from `Stores.ROS2_KILTED`,
whose definitions of the contract's standard messages equal Humble's, plus our
`globloc_msgs/msg/PoseGraphEdge` from `globloc/msg/`).

    seqs = read_bags(['data/scene'])                 # one Sequence per bag, sorted order = sequence id
    frame = seqs[0].frames[0]                        # image (H, W, 3) RGB, K, T_map_cam, depth, landmarks
    for frame in iter_frames('data/scene/seq_00'):   # a long recording: one frame in memory at a time
        ...

Frames are built around the images: each image is matched by header stamp (within `tolerance_ns`) to a
pose, a CameraInfo (or the only one, if latched once), and optionally depth and landmarks, among the messages
recorded within a bounded window of it (BagReader), so reading holds a few frames' messages whatever the bag's
length. Nothing is interpolated; images without a pose or calibration are dropped and counted per reason in the
`ReadReport`. A message that cannot be decoded, an image or depth encoding globloc_ros.imgmsg does not
convert included, skips its frame (counted, with a message naming file, topic and stamp); a contract
violation that would affect every frame (missing topic, size disagreeing with CameraInfo, lens distortion)
raises `BagError`, and so does a bag none of whose frames can be read. A truncated MCAP file keeps the
messages before the cut.

Conventions are those of `globloc_ros.frames`: T_map_cam of the OpenCV optical frame, metres,
quaternions (x, y, z, w), pixel centres at integer (u, v).
"""
from __future__ import annotations

import argparse
import functools
import heapq
import json
import struct
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import Reader, Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin
from rosbags.rosbag2.errors import ReaderError
from rosbags.rosbag2.storage_mcap import decompress, read_sized, read_string
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from tqdm import tqdm

from globloc import graph
from globloc_ros import frames as fr
from globloc_ros import imgmsg
from globloc_ros.bagfiles import BagError, Topics, bag_paths, storage_files  # noqa: F401 (globloc.bags.* elsewhere)

EDGE_MSGTYPE = 'globloc_msgs/msg/PoseGraphEdge'
EDGE_MSG_FILE = Path(__file__).with_name('msg') / 'PoseGraphEdge.msg'
DEPTH_ENCODINGS = tuple(imgmsg.DEPTH_ENCODINGS)
_MCAP_MAGIC = b'\x89MCAP0\r\n'


def parse_topics(items: Iterable[str] | None) -> Topics:
    """Command-line overrides ['pose=/slam/pose', 'odometry=/odom'] -> Topics (defaults elsewhere)."""
    names = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or key not in Topics.__dataclass_fields__ or not value.startswith('/'):
            raise ValueError(f'--topic {item!r}: expected KEY=/topic/name with KEY one of '
                             f'{", ".join(Topics.__dataclass_fields__)}')
        names[key] = value
    return Topics(**names)


def add_topic_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--topic', action='append', metavar='KEY=NAME', default=None,
                        help='topic name other than the contract default, e.g. pose=/slam/pose or '
                             'odometry=/odom (repeatable; keys: ' + ', '.join(Topics.__dataclass_fields__) + ')')


@dataclass
class Frame:
    """One posed image.

    seq: sequence id; index: position in its sequence; stamp_ns: image header stamp.
    image (H, W, 3) uint8 RGB; K (3, 3) float64 pixels; T_map_cam (4, 4) float64, metres.
    depth (H, W) float32 metres along the optical axis, NaN where invalid, or None.
    landmarks (M, 5) float32 rows (x, y, z, u, v): map-frame point (metres) and its pixel in `image`, or None.
    frame_id: the image's header.frame_id (the optical frame).
    """
    seq: int
    index: int
    stamp_ns: int
    image: np.ndarray
    K: np.ndarray
    T_map_cam: np.ndarray
    depth: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    frame_id: str = 'camera_optical'


@dataclass(frozen=True, slots=True)
class EdgeRecord:
    """One PoseGraphEdge message. Frames are named by (sequence id, image stamp in ns).

    T_i_j (4, 4) = T_map_i^-1 T_map_j; covariance (6, 6), order (x, y, z, rot x, rot y, rot z); kind 0/1.
    """
    seq_i: int
    stamp_i_ns: int
    seq_j: int
    stamp_j_ns: int
    kind: int
    T_i_j: np.ndarray
    covariance: np.ndarray


@dataclass
class ReadReport:
    """What reading one bag found.

    counts: messages per contract topic; matched: frames returned; unmatched: images dropped, per reason;
    missing: returned frames lacking an optional topic (depth, landmarks), per topic; corrupt: one line per
    skipped message or frame; warnings: other anomalies; truncated: the storage file ended early;
    labels: where landmarks came from ('landmarks', 'depth', 'landmarks+depth' or 'none').
    """
    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    matched: int = 0
    unmatched: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    corrupt: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False
    labels: str = 'none'

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f'{self.path}: {self.matched} frames',
                 '  messages: ' + ', '.join(f'{t} {n}' for t, n in self.counts.items())]
        if self.unmatched:
            lines.append('  dropped images: ' + ', '.join(f'{r}: {n}' for r, n in self.unmatched.items()))
        if self.missing:
            lines.append('  frames without: ' + ', '.join(f'{t} {n}' for t, n in self.missing.items()))
        lines += [f'  corrupt: {c}' for c in self.corrupt[:5]]
        if len(self.corrupt) > 5:
            lines.append(f'  ... {len(self.corrupt) - 5} more corrupt')
        lines += [f'  warning: {w}' for w in self.warnings]
        return '\n'.join(lines)


@dataclass
class Track:
    """What the relative-pose graph needs of one bag, without its images: seq, the sequence id; stamps_ns (N,)
    int64 image stamps and T_map_cam (N, 4, 4) float64 of its frames in order; edges: its PoseGraphEdge
    messages, None when it has no graph topic."""
    path: Path
    seq: int
    stamps_ns: np.ndarray
    T_map_cam: np.ndarray
    edges: list[EdgeRecord] | None = None

    @classmethod
    def of_frames(cls, path, seq: int, frames: Iterable[Frame], edges: list[EdgeRecord] | None) -> Track:
        frames = list(frames)
        return cls(Path(path), seq, np.array([f.stamp_ns for f in frames], np.int64).reshape(-1),
                   np.array([f.T_map_cam for f in frames], np.float64).reshape(-1, 4, 4), edges)


@dataclass
class Sequence:
    """The frames of one bag. edges: the bag's PoseGraphEdge messages, None when it has no graph topic."""
    path: Path
    seq: int
    frames: list[Frame]
    report: ReadReport
    edges: list[EdgeRecord] | None = None

    def track(self) -> Track:
        """Its frames' stamps and poses (what the relative-pose graph needs)."""
        return Track.of_frames(self.path, self.seq, self.frames, self.edges)


@functools.cache
def typestore():
    """The rosbags typestore used for reading and writing, with PoseGraphEdge registered."""
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg(EDGE_MSG_FILE.read_text(), EDGE_MSGTYPE))
    return store


# ---------------------------------------------------------------------------------------------- raw I/O
def _stamp(msg_stamp) -> int:
    return int(msg_stamp.sec) * 1_000_000_000 + int(msg_stamp.nanosec)


def _fmt_stamp(stamp_ns: int) -> str:
    return f'{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d}'


def _salvage_mcap(file: Path, report: ReadReport) -> tuple[dict[str, str], list[tuple[str, int, bytes]]]:
    """Topics and messages of an MCAP file whose summary is unreadable (e.g. cut short).

    Scans records from the start and stops at the first incomplete one; chunks are checked by their CRC.
    Returns {topic: msgtype} and a list of (topic, log time ns, raw CDR).
    """
    with file.open('rb') as bio:
        if bio.read(8) != _MCAP_MAGIC:
            raise BagError(f'{file}: not a rosbag2 bag (neither a bag folder, an MCAP file nor an sqlite3 .db3)')
        schemas: dict[int, str] = {}
        channels: dict[int, tuple[str, str]] = {}
        messages: list[tuple[str, int, bytes]] = []

        def scan(stream, end: int) -> None:
            while stream.tell() < end:
                op = stream.read(1)
                if not op:
                    raise EOFError
                if op[0] == 0x06:
                    rec = BytesIO(read_sized(stream))
                    _, _, size, crc = struct.unpack('<QQQI', rec.read(28))
                    compression = read_string(rec)
                    (csize,) = struct.unpack('<Q', rec.read(8))
                    scan(BytesIO(decompress(rec.read(csize), compression, size, crc)), size)
                    continue
                rec = BytesIO(read_sized(stream))
                if op[0] == 0x03:
                    (sid,) = struct.unpack('<H', rec.read(2))
                    schemas[sid] = read_string(rec)
                elif op[0] == 0x04:
                    cid, sid = struct.unpack('<HH', rec.read(4))
                    channels[cid] = (read_string(rec), schemas.get(sid, ''))
                elif op[0] == 0x05:
                    cid, _, log_time, _ = struct.unpack('<HIQQ', rec.read(22))
                    if cid in channels:
                        messages.append((channels[cid][0], log_time, rec.read()))
                elif op[0] == 0x0F:  # DataEnd: only the summary follows, which is what was unreadable
                    return

        bio.read(1)
        read_sized(bio)  # header record
        try:
            scan(bio, file.stat().st_size)
        except Exception as e:  # noqa: BLE001
            # Whatever the cut looks like (mid-record, mid-chunk, bad CRC), keep the messages before it.
            report.warnings.append(f'{file}: storage ends early or is damaged after {len(messages)} messages '
                                   f'({type(e).__name__}: {e}); keeping those')
    report.truncated = True
    return dict(channels.values()), messages


class _Messages:
    """Topics of a bag and an iterator of (topic, log time, raw CDR) for chosen topics."""

    def __init__(self, path: Path, report: ReadReport):
        self.path = path
        self.report = report
        self._reader = None
        if not path.exists():
            raise BagError(f'{path}: no such bag (file or folder does not exist)')
        try:
            self._reader = Reader(path)
            self._reader.open()
            self.topics = {c.topic: c.msgtype for c in self._reader.connections}
            self.totals = Counter()
            for c in self._reader.connections:
                self.totals[c.topic] += c.msgcount
            self._salvaged = None
        except (ReaderError, FileNotFoundError, OSError, ValueError, KeyError) as e:
            self._reader = None
            # A damaged MCAP index or summary is worth a scan; anything else is not a bag we can read.
            mcaps = [path] if path.is_file() else [f for f in storage_files(path) if f.suffix == '.mcap']
            if not mcaps:
                raise BagError(f'{path}: not a rosbag2 bag ({e})') from e
            self.topics, merged = {}, []
            for f in mcaps:
                topics, msgs = _salvage_mcap(f, report)
                self.topics.update(topics)
                merged.extend(msgs)
            merged.sort(key=lambda m: m[1])
            self._salvaged = merged
            self.totals = Counter(m[0] for m in merged)

    def messages(self, topics: set[str]) -> Iterator[tuple[str, int, bytes]]:
        if self._salvaged is not None:
            yield from (m for m in self._salvaged if m[0] in topics)
            return
        conns = [c for c in self._reader.connections if c.topic in topics]
        n = 0
        try:
            for conn, t, raw in self._reader.messages(connections=conns):
                n += 1
                yield conn.topic, t, raw
        except (ReaderError, struct.error, ValueError, EOFError) as e:
            self.report.truncated = True
            self.report.warnings.append(f'{self.path}: storage damaged after {n} messages ({e}); keeping those')

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# ---------------------------------------------------------------------------------------------- decoding
def _decode_image(msg, where: str) -> np.ndarray:
    """Image (any encoding imgmsg converts) or CompressedImage -> (H, W, 3) uint8 RGB, writable and contiguous,
    with globloc_ros.imgmsg.to_rgb, the node's conversion. Raises ValueError naming `where` for a frame that
    cannot be decoded (an unsupported encoding included): the caller skips and reports that frame."""
    try:
        rgb = imgmsg.to_rgb(msg)
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from e
    # rgb8 comes back as a view of the message buffer
    return rgb if rgb.flags.writeable and rgb.flags.c_contiguous else rgb.copy()


def decode_depth(msg, where: str) -> np.ndarray:
    """Image 32FC1 (metres) or 16UC1 (millimetres), or a compressedDepth CompressedImage -> (H, W) float32
    metres, NaN where 0, NaN or inf. Raises ValueError naming `where` (the frame is skipped)."""
    try:
        return imgmsg.depth_to_metres(msg)
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from e


def decode_landmarks(msg, where: str) -> np.ndarray:
    """PointCloud2 with float32 fields x y z u v -> (M, 5) float32."""
    offsets = {f.name: f.offset for f in msg.fields if f.datatype == 7 and f.count == 1}  # 7 = FLOAT32
    names = ('x', 'y', 'z', 'u', 'v')
    if not all(n in offsets for n in names):
        raise BagError(f'{where}: PointCloud2 needs float32 fields x y z u v, has '
                       f'{[(f.name, f.datatype) for f in msg.fields]}')
    n = int(msg.width) * int(msg.height)
    dt = np.dtype({'names': list(names), 'formats': ['>f4' if msg.is_bigendian else '<f4'] * 5,
                   'offsets': [offsets[k] for k in names], 'itemsize': int(msg.point_step)})
    data = imgmsg.byte_array(msg.data)
    if data.size < n * msg.point_step:
        raise ValueError(f'{where}: PointCloud2 of {n} points needs {n * msg.point_step} bytes, has {data.size}')
    rec = np.frombuffer(data[:n * msg.point_step].tobytes(), dtype=dt)
    return np.stack([rec[k] for k in names], axis=1).astype(np.float32)


def _pose_of(pose, where: str) -> np.ndarray:
    """geometry_msgs/Pose -> T (4, 4); ValueError naming `where` for a NaN or non-unit quaternion."""
    p, q = pose.position, pose.orientation
    try:
        return fr.pose_from_xyz_quat([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])
    except ValueError as e:
        raise ValueError(f'{where}: {e}') from e


def _intrinsics(info, where: str, image_shape: tuple[int, int]) -> np.ndarray:
    """K (3, 3) of a CameraInfo checked by globloc_ros.imgmsg, for an image of (H, W); BagError naming `where`."""
    try:
        cam = imgmsg.Intrinsics.from_camera_info(info)
    except ValueError as e:
        raise BagError(f'{where}: {e}') from e
    h, w = image_shape
    if cam.size != (w, h):
        raise BagError(f'{where}: image is {w}x{h} but its CameraInfo says {cam.size[0]}x{cam.size[1]}')
    if cam.distorted:
        # Undistorting would also have to move the landmarks and the depth; the contract asks for rectified
        # images, so say so rather than silently using distorted pixels.
        raise BagError(f'{where}: CameraInfo has non-zero distortion d={cam.d.tolist()} '
                       f'({cam.model}); rectify the images first (e.g. image_proc)')
    return cam.K


# ---------------------------------------------------------------------------------------------- labels
def check_label_fraction(label_fraction: float) -> float:
    """The fraction of pixels that get a 3D label; must lie in (0, 1]."""
    f = float(label_fraction)
    if not 0.0 < f <= 1.0:
        raise ValueError(f'label_fraction must be in (0, 1], got {label_fraction}')
    return f


def label_count(label_fraction: float, width: int, height: int) -> int:
    """How many labels an image of width x height pixels gets at this fraction (at least one)."""
    return max(1, round(check_label_fraction(label_fraction) * width * height))


def label_rng(seed: int, stamp_ns: int) -> np.random.Generator:
    """The generator for one frame's label draw: depends only on the seed and the frame's stamp."""
    return np.random.default_rng([int(seed), int(stamp_ns)])


def labels_from_depth(depth: np.ndarray, K: np.ndarray, T_map_cam: np.ndarray, label_fraction: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Sparse labels drawn from depth: (M, 5) float32 rows (x, y, z, u, v), map frame and pixel centres.

    depth (H, W) metres (NaN invalid), K (3, 3), T_map_cam (4, 4). M = label_count(...) or fewer if fewer
    pixels are valid; pixels drawn without replacement, returned in row-major pixel order.
    """
    h, w = depth.shape
    n = label_count(label_fraction, w, h)
    valid = np.flatnonzero(np.isfinite(depth.reshape(-1)))
    pick = np.sort(rng.choice(valid, size=min(n, valid.size), replace=False))
    v, u = np.divmod(pick, w)
    z = depth.reshape(-1)[pick].astype(np.float64)
    X_cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
    X_map = X_cam @ T_map_cam[:3, :3].T + T_map_cam[:3, 3]
    return np.column_stack([X_map, u, v]).astype(np.float32)


def subsample_labels(landmarks: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n rows of (M, 5) landmarks, kept in their stored order (which may be strongest first)."""
    if landmarks.shape[0] <= n:
        return landmarks
    return landmarks[np.sort(rng.choice(landmarks.shape[0], size=n, replace=False))]


# ---------------------------------------------------------------------------------------------- reading
# How far apart in log time the messages of one frame may have been recorded (a driver's latency, a recorder's
# queues): an image waits at most this long for its pose, CameraInfo, depth and landmarks, and a message is kept at
# most twice this long for an image still to come. It bounds what the reader holds, whatever the bag's length.
WINDOW_NS = 1_000_000_000
PARTNERS = ('pose', 'camera_info', 'depth', 'landmarks')


class _Held:
    """Messages of one partner topic held for matching: (log time ns, header stamp ns, message), arrival order."""

    def __init__(self, total: int):
        self.items: deque[tuple[int, int, object]] = deque()
        self.total = total  # messages the bag's index announces for the topic
        self.seen = 0
        self.latest: int | None = None  # the largest header stamp seen

    def add(self, log_ns: int, stamp: int, msg) -> None:
        self.items.append((log_ns, stamp, msg))
        self.seen += 1
        self.latest = stamp if self.latest is None else max(self.latest, stamp)

    def passed(self, stamp: int, tolerance_ns: int) -> bool:
        """No message still to come can lie within tolerance of `stamp` (each topic comes in stamp order)."""
        return self.seen >= self.total or (self.latest is not None and self.latest > stamp + tolerance_ns)

    def nearest(self, stamp: int, tolerance_ns: int):
        """The held message whose header stamp is nearest to `stamp`, if within tolerance, else None."""
        best, best_d = None, tolerance_ns + 1
        for _, s, msg in self.items:
            if abs(s - stamp) < best_d:
                best, best_d = msg, abs(s - stamp)
        return best

    def prune(self, min_stamp: int, min_log_ns: int) -> None:
        """Drop what no image to come can match: stamps below min_stamp, or recorded before min_log_ns."""
        if any(s < min_stamp or t < min_log_ns for t, s, _ in self.items):
            self.items = deque(x for x in self.items if x[1] >= min_stamp and x[0] >= min_log_ns)


class BagReader:
    """The frames of one bag (a rosbag2 folder, or an .mcap / .db3 file) as a stream.

        reader = BagReader('data/scene/seq_00')   # opens the bag; BagError when a contract topic is missing
        for frame in reader: ...                  # Frames in stamp order, decoded one at a time
        reader.report, reader.edges               # complete once the frames are exhausted

    Messages are read in log-time order. Each image is matched by header stamp to the nearest pose, CameraInfo
    (or the bag's only one, latched), depth and landmarks within `tolerance_ns`, among the messages recorded
    within `window_ns` of it; it is decoded and yielded as soon as no message still to come can be nearer (the
    partner topics have moved past its stamp), or when it has waited `window_ns`. Messages are dropped once no
    image to come can use them, so the reader holds about two windows of raw messages at most (`peak_held`
    counts them), whatever the bag's length. An image whose stamp is not after the last one read (a duplicate, or
    out of order by more than the window) is dropped and counted.

    Arguments as read_sequence; iterate once. Stopping early (max_frames, or the caller breaking off) leaves the
    report with what was read so far.
    """

    def __init__(self, path, seq: int = 0, topics: Topics = Topics(), size: tuple[int, int] | None = None,
                 tolerance_ns: int = 1_000_000, label_fraction: float = 0.005, seed: int = 0,
                 max_frames: int | None = None, progress: bool = True, window_ns: int = WINDOW_NS):
        self.path, self.seq, self.topics, self.size = Path(path), seq, topics, size
        self.tolerance_ns, self.window_ns = int(tolerance_ns), int(window_ns)
        self.label_fraction, self.seed = check_label_fraction(label_fraction), seed
        self.max_frames, self.progress = max_frames, progress
        self.report = ReadReport(self.path)
        self.peak_held = 0
        self._started = False
        self._src = _Messages(self.path, self.report)
        try:
            self._check_topics()
        except BaseException:
            self._src.close()
            raise
        self.edges: list[EdgeRecord] | None = [] if 'graph' in self._roles else None
        self._covariances: dict[bytes, np.ndarray] = {}  # the edges' covariances, one read-only array per value

    @property
    def expected_images(self) -> int:
        """How many images the bag's index announces (frames come out fewer when some do not match)."""
        return int(self._src.totals.get(self.image_topic, 0))

    def _check_topics(self) -> None:
        path, topics, present = self.path, self.topics, self._src.topics
        listing = ', '.join(f'{t} ({present[t]})' for t in sorted(present)) or 'none'
        if self.report.truncated:
            listing += ' (' + '; '.join(self.report.warnings) + ')'

        def require(topic: str, what: str) -> None:
            if topic not in present:
                raise BagError(f'{path}: {what} topic {topic!r} not in bag; topics present: {listing}')

        self.image_topic = topics.image if topics.image in present else topics.compressed
        if self.image_topic not in present:
            raise BagError(f'{path}: no image topic ({topics.image!r} or {topics.compressed!r}) in bag; '
                           f'topics present: {listing}')
        self.pose_topic = topics.odometry or topics.pose
        require(self.pose_topic, 'odometry' if topics.odometry else 'pose')
        require(topics.camera_info, 'camera_info')
        self._wanted = {self.image_topic: 'image', self.pose_topic: 'pose', topics.camera_info: 'camera_info'}
        for topic, role in ((topics.depth, 'depth'), (topics.landmarks, 'landmarks'), (topics.graph, 'graph')):
            if topic in present:
                self._wanted[topic] = role
        self._roles = {role: topic for topic, role in self._wanted.items()}

    def __iter__(self) -> Iterator[Frame]:
        if self._started:
            raise RuntimeError(f'{self.path}: a BagReader reads its bag once; open another')
        self._started = True
        src, report = self._src, self.report
        self._counts: Counter = Counter()
        self._unmatched: Counter = Counter()
        self._missing: Counter = Counter()
        self._sources: set[str] = set()
        self._images: list = []  # heap of (stamp, arrival, log time, message)
        self._held = {role: _Held(src.totals.get(self._roles[role], 0)) for role in PARTNERS if role in self._roles}
        self._latched = self._latched_info()
        self._last_stamp: int | None = None
        self._n = 0
        bar = tqdm(total=sum(src.totals.get(t, 0) for t in self._wanted), desc=self.path.name, unit='msg',
                   disable=not self.progress, leave=False)
        try:
            yield from self._frames(bar)
        finally:
            bar.close()
            src.close()
            self._update_report()
        for line in report.corrupt[:3] + report.warnings:
            warnings.warn(line, stacklevel=2)
        if self._n == 0:
            why = '; '.join([*(f'{r}: {n}' for r, n in self._unmatched.items()), *report.corrupt[:3],
                             *report.warnings])
            raise BagError(f'{self.path}: no readable frames ({self._counts[self.image_topic]} images on '
                           f'{self.image_topic}; {why or "empty"})')

    def _frames(self, bar) -> Iterator[Frame]:
        store, present = typestore(), self._src.topics
        for k, (topic, log_ns, data) in enumerate(self._src.messages(set(self._wanted))):
            bar.update(1)
            self._counts[topic] += 1
            try:
                msg = store.deserialize_cdr(data, present[topic])
            except Exception as e:  # noqa: BLE001 - any decoder failure means this one message is corrupt
                self.report.corrupt.append(f'{self.path}: {topic} message at log time {_fmt_stamp(log_ns)} does '
                                           f'not deserialise as {present[topic]} ({type(e).__name__}: {e})')
                continue
            role = self._wanted[topic]
            if role == 'graph':
                self.edges += _edge_records([(log_ns, msg)], self.path, topic, self.report, self._covariances)
                continue
            if role == 'image':
                heapq.heappush(self._images, (_stamp(msg.header.stamp), k, log_ns, msg))
            else:
                self._held[role].add(log_ns, _stamp(msg.header.stamp), msg)
            self.peak_held = max(self.peak_held, len(self._images) + sum(len(h.items) for h in self._held.values()))
            for frame in self._ready(log_ns):
                yield frame
                if self.max_frames is not None and self._n >= self.max_frames:
                    return
            for h in self._held.values():
                h.prune(-2**63, log_ns - 2 * self.window_ns)
        for frame in self._ready(None):
            yield frame
            if self.max_frames is not None and self._n >= self.max_frames:
                return

    def _ready(self, now_ns: int | None) -> Iterator[Frame]:
        """Frames of the held images that can be matched now (now_ns: log time of the last message read; None:
        the bag has ended), in stamp order."""
        tol = self.tolerance_ns
        while self._images:
            stamp, _, log_ns, msg = self._images[0]
            if now_ns is not None and now_ns - log_ns <= self.window_ns and not all(
                    h.passed(stamp, tol) for role, h in self._held.items()
                    if not (role == 'camera_info' and self._latched is not None)):
                return
            heapq.heappop(self._images)
            last = self._last_stamp
            if last is not None and stamp <= last:
                why = 'duplicate image stamp' if stamp == last else \
                    f'image stamp before the last one read (out of order by more than {self.window_ns / 1e9:g} s)'
                self._unmatched[why] += 1
                continue
            self._last_stamp = stamp
            frame = self._match(stamp, msg)
            for h in self._held.values():
                h.prune(stamp - tol, -2**63)
            if frame is not None:
                yield frame

    def _latched_info(self):
        """The bag's CameraInfo when it has exactly one (latched, e.g. recorded once at the start), else None."""
        topic = self.topics.camera_info
        if self._src.totals.get(topic, 0) != 1:
            return None
        for _, _, data in self._src.messages({topic}):
            try:
                return typestore().deserialize_cdr(data, self._src.topics[topic])
            except Exception:  # noqa: BLE001 - reported when the main pass reaches it
                return None
        return None

    def _match(self, stamp: int, img_msg) -> Frame | None:
        """The frame of one image, or None (counted in the report) when it lacks a pose or calibration or does
        not decode."""
        path, topics, tol, held = self.path, self.topics, self.tolerance_ns, self._held
        where = f'{path}: {self.image_topic} at stamp {_fmt_stamp(stamp)}'
        pose_msg = held['pose'].nearest(stamp, tol)
        info = self._latched or held['camera_info'].nearest(stamp, tol)
        if pose_msg is None:
            self._unmatched[f'no {self.pose_topic} within {tol / 1e6:g} ms'] += 1
            return None
        if info is None:
            self._unmatched[f'no {topics.camera_info} within {tol / 1e6:g} ms'] += 1
            return None
        try:
            image = _decode_image(img_msg, where)
            pose = pose_msg.pose.pose if self._src.topics[self.pose_topic].endswith('Odometry') else pose_msg.pose
            T = _pose_of(pose, f'{path}: {self.pose_topic} at stamp {_fmt_stamp(_stamp(pose_msg.header.stamp))}')
            depth = landmarks = None
            if 'depth' in held:
                depth_msg = held['depth'].nearest(stamp, tol)
                if depth_msg is None:
                    self._missing[topics.depth] += 1
                else:
                    dwhere = f'{path}: {topics.depth} at stamp {_fmt_stamp(stamp)}'
                    depth = decode_depth(depth_msg, dwhere)
                    if depth.shape != image.shape[:2]:
                        raise BagError(f'{dwhere}: depth is {depth.shape[1]}x{depth.shape[0]} but the image '
                                       f'is {image.shape[1]}x{image.shape[0]} (must be registered to it)')
            if 'landmarks' in held:
                lm_msg = held['landmarks'].nearest(stamp, tol)
                if lm_msg is None:
                    self._missing[topics.landmarks] += 1
                else:
                    landmarks = decode_landmarks(lm_msg, f'{path}: {topics.landmarks} at stamp {_fmt_stamp(stamp)}')
        except ValueError as e:
            self.report.corrupt.append(str(e))
            return None
        K = _intrinsics(info, f'{path}: {topics.camera_info} for image stamp {_fmt_stamp(stamp)}', image.shape[:2])
        frame = Frame(seq=self.seq, index=self._n, stamp_ns=stamp, image=image, K=K, T_map_cam=T,
                      depth=depth, landmarks=landmarks, frame_id=img_msg.header.frame_id)
        if self.size is not None:
            _resize(frame, self.size)
        h, w = frame.image.shape[:2]
        if frame.landmarks is not None:
            frame.landmarks = subsample_labels(frame.landmarks, label_count(self.label_fraction, w, h),
                                               label_rng(self.seed, stamp))
            self._sources.add('landmarks')
        elif frame.depth is not None:
            frame.landmarks = labels_from_depth(frame.depth, frame.K, frame.T_map_cam, self.label_fraction,
                                                label_rng(self.seed, stamp))
            self._sources.add('depth')
        self._n += 1
        return frame

    def _update_report(self) -> None:
        r = self.report
        r.counts = {t: self._counts.get(t, 0) for t in self._wanted}
        r.matched, r.unmatched, r.missing = self._n, dict(self._unmatched), dict(self._missing)
        r.labels = '+'.join(sorted(self._sources, reverse=True)) or 'none'


def iter_frames(path, **kwargs) -> Iterator[Frame]:
    """The frames of one bag, streamed (BagReader; kwargs as read_sequence): for a long recording, where a list
    of all its frames would not fit in memory. The report is BagReader's."""
    yield from BagReader(path, **kwargs)


def _resize(frame: Frame, size: tuple[int, int]) -> None:
    W, H = size
    h, w = frame.image.shape[:2]
    if (W, H) == (w, h):
        return
    sx, sy = W / w, H / h
    interp = cv2.INTER_AREA if sx < 1 and sy < 1 else cv2.INTER_LINEAR
    frame.image = cv2.resize(frame.image, (W, H), interpolation=interp)
    frame.K = fr.scale_intrinsics(frame.K, sx, sy)
    if frame.depth is not None:
        # Nearest with the pixel-centre rule, so each depth value still belongs to one real ray.
        frame.depth = cv2.resize(frame.depth, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
    if frame.landmarks is not None:
        lm = frame.landmarks.copy()
        lm[:, 3] = (lm[:, 3] + 0.5) * sx - 0.5
        lm[:, 4] = (lm[:, 4] + 0.5) * sy - 0.5
        frame.landmarks = lm


def read_sequence(path, seq: int = 0, topics: Topics = Topics(), size: tuple[int, int] | None = None,
                  tolerance_ns: int = 1_000_000, label_fraction: float = 0.005, seed: int = 0,
                  max_frames: int | None = None, progress: bool = True, window_ns: int = WINDOW_NS) -> Sequence:
    """Read one bag (a rosbag2 folder, or an .mcap / .db3 file) into a Sequence: all its frames in a list, for a
    short bag (BagReader or iter_frames stream a long one).

    size: (W, H) to resize every frame to (K scaled with the pixel-centre rule, depth nearest, landmark
    u, v scaled), None keeps the stored size. label_fraction in (0, 1]: stored landmarks are subsampled
    to at most label_count(...) per frame; frames without landmarks but with depth get that many labels
    drawn from depth. Both draws depend only on (seed, frame stamp). max_frames: keep the first N frames (and
    read no further). window_ns: see BagReader.
    Raises BagError (file, topic, stamp in the message) when the bag cannot be read as the contract.
    """
    reader = BagReader(path, seq=seq, topics=topics, size=size, tolerance_ns=tolerance_ns,
                       label_fraction=label_fraction, seed=seed, max_frames=max_frames, progress=progress,
                       window_ns=window_ns)
    frames = list(reader)
    return Sequence(path=reader.path, seq=seq, frames=frames, report=reader.report, edges=reader.edges)


def _edge_records(items: list, path: Path, topic: str, report: ReadReport,
                  covariances: dict[bytes, np.ndarray]) -> list[EdgeRecord]:
    """PoseGraphEdge messages [(log time ns, message)] -> EdgeRecords; one that does not decode is reported and
    skipped. covariances: one read-only array per distinct covariance, shared by the edges that have it (a long
    recording's edges mostly carry the same one: half their memory)."""
    out = []
    for log_ns, m in items:
        try:
            T = _pose_of(m.relative_pose, f'{path}: {topic} at log time {_fmt_stamp(log_ns)}')
        except ValueError as e:
            report.corrupt.append(str(e))
            continue
        cov = np.asarray(m.covariance, dtype=np.float64).reshape(6, 6)
        cov = covariances.setdefault(cov.tobytes(), cov.copy())
        cov.setflags(write=False)
        out.append(EdgeRecord(seq_i=int(m.seq_i), stamp_i_ns=_stamp(m.stamp_i), seq_j=int(m.seq_j),
                              stamp_j_ns=_stamp(m.stamp_j), kind=int(m.kind), T_i_j=T, covariance=cov))
    return out


def read_bags(paths, **kwargs) -> list[Sequence]:
    """Read several bags; sequence ids are their positions in `bag_paths(paths)`. kwargs: see read_sequence."""
    return [read_sequence(p, seq=i, **kwargs) for i, p in enumerate(bag_paths(paths))]


# ---------------------------------------------------------------------------------------------- writing
def write_sequence(path, frames: Iterable[Frame], edges: Iterable[EdgeRecord] | None = None,
                   topics: Topics = Topics(), compressed: bool | str = False, camera_info_once: bool = False,
                   depth_encoding: str = '32FC1') -> None:
    """Write frames (and graph edges) as a new rosbag2 folder with one zstd-chunked MCAP file.

    Images go to topics.image as rgb8, or with compressed='jpeg'/'png' (True = 'jpeg') to topics.compressed;
    depth as 32FC1 metres or 16UC1 millimetres; pose as PoseStamped (frame map) or Odometry when
    topics.odometry is set; landmarks as PointCloud2 x y z u v. Header stamp == log time == frame.stamp_ns.
    `frames` may be a generator, so a long sequence never has to be held in memory.
    """
    store = typestore()
    t = store.types
    fmt = {True: 'jpeg', False: None}.get(compressed, compressed)
    if fmt not in (None, 'jpeg', 'png'):
        raise ValueError(f'compressed must be False, True, "jpeg" or "png", got {compressed!r}')
    if depth_encoding not in DEPTH_ENCODINGS:
        raise ValueError(f'depth_encoding must be one of {DEPTH_ENCODINGS}, got {depth_encoding!r}')
    writer = Writer(Path(path), version=9, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    writer.open()
    conns: dict[str, tuple] = {}

    def put(topic: str, msgtype: str, msg, stamp_ns: int) -> None:
        if topic not in conns:
            conns[topic] = (writer.add_connection(topic, msgtype, typestore=store), msgtype)
        conn, typ = conns[topic]
        writer.write(conn, stamp_ns, store.serialize_cdr(msg, typ))

    def header(stamp_ns: int, frame_id: str):
        return t['std_msgs/msg/Header'](stamp=_time_msg(stamp_ns), frame_id=frame_id)

    try:
        for f in frames:
            s = f.stamp_ns
            h, w = f.image.shape[:2]
            if not camera_info_once or topics.camera_info not in conns:
                P = np.hstack([f.K, np.zeros((3, 1))])
                info = t['sensor_msgs/msg/CameraInfo'](
                    header=header(s, f.frame_id), height=h, width=w, distortion_model='plumb_bob',
                    d=np.zeros(5), k=f.K.astype(np.float64).reshape(-1), r=np.eye(3).reshape(-1),
                    p=P.reshape(-1), binning_x=0, binning_y=0,
                    roi=t['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                               do_rectify=False))
                put(topics.camera_info, 'sensor_msgs/msg/CameraInfo', info, s)
            if fmt is None:
                img = t['sensor_msgs/msg/Image'](header=header(s, f.frame_id), height=h, width=w,
                                                 encoding='rgb8', is_bigendian=0, step=w * 3,
                                                 data=np.ascontiguousarray(f.image, dtype=np.uint8).reshape(-1))
                put(topics.image, 'sensor_msgs/msg/Image', img, s)
            else:
                ok, buf = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png', f.image[:, :, ::-1],
                                       [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == 'jpeg' else [])
                if not ok:
                    raise BagError(f'{path}: could not encode image at stamp {_fmt_stamp(s)} as {fmt}')
                img = t['sensor_msgs/msg/CompressedImage'](header=header(s, f.frame_id), format=fmt,
                                                           data=buf.reshape(-1))
                put(topics.compressed, 'sensor_msgs/msg/CompressedImage', img, s)
            if f.depth is not None:
                if depth_encoding == '32FC1':
                    d = np.ascontiguousarray(f.depth, dtype=np.float32)
                else:
                    mm = np.nan_to_num(f.depth * 1000.0, nan=0.0, posinf=0.0, neginf=0.0)
                    d = np.clip(np.round(mm), 0, 65535).astype(np.uint16)
                msg = t['sensor_msgs/msg/Image'](header=header(s, f.frame_id), height=h, width=w,
                                                 encoding=depth_encoding, is_bigendian=0,
                                                 step=w * d.itemsize, data=d.view(np.uint8).reshape(-1))
                put(topics.depth, 'sensor_msgs/msg/Image', msg, s)
            pose = _pose_msg(t, f.T_map_cam)
            if topics.odometry:
                odom = t['nav_msgs/msg/Odometry'](
                    header=header(s, 'map'), child_frame_id=f.frame_id,
                    pose=t['geometry_msgs/msg/PoseWithCovariance'](pose=pose, covariance=np.zeros(36)),
                    twist=t['geometry_msgs/msg/TwistWithCovariance'](
                        twist=t['geometry_msgs/msg/Twist'](linear=t['geometry_msgs/msg/Vector3'](x=0., y=0., z=0.),
                                                           angular=t['geometry_msgs/msg/Vector3'](x=0., y=0., z=0.)),
                        covariance=np.zeros(36)))
                put(topics.odometry, 'nav_msgs/msg/Odometry', odom, s)
            else:
                put(topics.pose, 'geometry_msgs/msg/PoseStamped',
                    t['geometry_msgs/msg/PoseStamped'](header=header(s, 'map'), pose=pose), s)
            if f.landmarks is not None:
                lm = np.ascontiguousarray(f.landmarks, dtype=np.float32).reshape(-1, 5)
                PF = t['sensor_msgs/msg/PointField']
                pc = t['sensor_msgs/msg/PointCloud2'](
                    header=header(s, 'map'), height=1, width=lm.shape[0],
                    fields=[PF(name=n, offset=4 * i, datatype=7, count=1) for i, n in enumerate('xyzuv')],
                    is_bigendian=False, point_step=20, row_step=20 * lm.shape[0],
                    data=lm.view(np.uint8).reshape(-1), is_dense=True)
                put(topics.landmarks, 'sensor_msgs/msg/PointCloud2', pc, s)
        for e in edges or ():
            msg = t[EDGE_MSGTYPE](stamp_i=_time_msg(e.stamp_i_ns), stamp_j=_time_msg(e.stamp_j_ns),
                                  seq_i=int(e.seq_i), seq_j=int(e.seq_j), relative_pose=_pose_msg(t, e.T_i_j),
                                  covariance=np.asarray(e.covariance, dtype=np.float64).reshape(-1),
                                  kind=int(e.kind))
            put(topics.graph, EDGE_MSGTYPE, msg, e.stamp_i_ns)
    finally:
        writer.close()


def _time_msg(stamp_ns: int):
    return typestore().types['builtin_interfaces/msg/Time'](sec=int(stamp_ns // 1_000_000_000),
                                                            nanosec=int(stamp_ns % 1_000_000_000))


def _pose_msg(t, T: np.ndarray):
    p, q = fr.pose_to_xyz_quat(T)
    return t['geometry_msgs/msg/Pose'](
        position=t['geometry_msgs/msg/Point'](x=float(p[0]), y=float(p[1]), z=float(p[2])),
        orientation=t['geometry_msgs/msg/Quaternion'](x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


# ---------------------------------------------------------------------------------------------- info, bench
class _BagSummary:
    """What `globloc info` says about one bag, gathered frame by frame (no image is kept)."""

    def __init__(self):
        self.stamps: list[int] = []
        self.poses: list[np.ndarray] = []
        self.size, self.with_depth, self.labels, self.pixels = None, 0, 0, 0
        self.lm_extent: list[np.ndarray] = []  # per frame, the corners of its landmarks' bounding box

    def add(self, f: Frame) -> None:
        h, w = f.image.shape[:2]
        self.size = self.size or f'{w}x{h}'
        self.with_depth += f.depth is not None
        self.pixels += h * w
        if f.landmarks is not None:
            self.labels += len(f.landmarks)
            pts = f.landmarks[np.all(np.isfinite(f.landmarks[:, :3]), axis=1), :3]
            if len(pts):
                self.lm_extent.append(np.stack([pts.min(0), pts.max(0)]))
        self.stamps.append(f.stamp_ns)
        self.poses.append(f.T_map_cam)

    def track(self, path: Path, seq: int, edges: list[EdgeRecord] | None) -> Track:
        return Track(Path(path), seq, np.array(self.stamps, np.int64), np.array(self.poses).reshape(-1, 4, 4), edges)

    def entry(self, path: Path, seq: int, report: ReadReport) -> dict:
        centres = np.array([T[:3, 3] for T in self.poses]).reshape(-1, 3)
        stamps = self.stamps
        return {'path': str(path), 'seq': seq, 'size': self.size, 'messages': report.counts,
                'matched_frames': report.matched, 'dropped': report.unmatched, 'frames_without': report.missing,
                'corrupt': len(report.corrupt), 'truncated': report.truncated, 'frames_with_depth': self.with_depth,
                'labels': report.labels, 'label_fraction': self.labels / self.pixels,
                'time_span_s': (max(stamps) - min(stamps)) / 1e9, 'camera_centres_bbox': _bbox(centres),
                'landmarks_bbox': _bbox(np.concatenate(self.lm_extent or [np.zeros((0, 3))]))}


def _scene(bags: list[tuple[dict, Track]]) -> dict:
    tracks = [t for _, t in bags]
    edges, source = graph.scene_edges(tracks)
    boxes = [np.array(b[k]) for b, _ in bags for k in ('landmarks_bbox',) if b[k] is not None]
    return {'bags': [b for b, _ in bags], 'edges_source': source,
            'edges': graph.edge_counts(edges),
            'camera_centres_bbox': _bbox(np.concatenate([t.T_map_cam[:, :3, 3] for t in tracks])),
            'landmarks_bbox': _bbox(np.concatenate(boxes or [np.zeros((0, 3))]))}


def summarise_bags(paths, **kwargs) -> dict:
    """Counts and extents of bags (what `globloc info` prints), as a JSON-friendly dict; streamed (BagReader;
    kwargs as read_sequence): no bag is ever held in memory."""
    out = []
    for i, p in enumerate(bag_paths(paths)):
        reader, acc = BagReader(p, seq=i, **kwargs), _BagSummary()
        for f in reader:
            acc.add(f)
        out.append((acc.entry(reader.path, i, reader.report), acc.track(p, i, reader.edges)))
    return _scene(out)


def _bbox(points: np.ndarray) -> list | None:
    points = np.asarray(points, dtype=np.float64)
    points = points[np.all(np.isfinite(points), axis=1)]
    if points.size == 0:
        return None
    return [(np.round(points.min(0), 3) + 0.0).tolist(), (np.round(points.max(0), 3) + 0.0).tolist()]  # no -0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('paths', nargs='+', help='bag folders, .mcap/.db3 files or folders of bag folders')
    parser.add_argument('--size', type=parse_size, default=None, help='resize to WxH before counting labels')
    parser.add_argument('--label-fraction', type=float, default=0.005, help='label fraction (default 0.005)')
    parser.add_argument('--tolerance-ms', type=float, default=1.0, help='stamp matching tolerance (ms)')
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')


def parse_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240), i.e. (W, H); for argparse."""
    try:
        w, h = (int(x) for x in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'size must be WxH, e.g. 320x240, got {text!r}') from None
    return w, h


def run(args: argparse.Namespace) -> int:
    summary = summarise_bags(args.paths, size=args.size, label_fraction=args.label_fraction,
                             tolerance_ns=int(args.tolerance_ms * 1e6), progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for b in summary['bags']:
        print(f'[{b["seq"]}] {b["path"]}  {b["size"]}  {b["matched_frames"]} frames over {b["time_span_s"]:.1f} s')
        print('    messages: ' + ', '.join(f'{t} {n}' for t, n in b['messages'].items()))
        if b['dropped'] or b['frames_without'] or b['corrupt'] or b['truncated']:
            print(f'    dropped: {b["dropped"]}  without: {b["frames_without"]}  corrupt: {b["corrupt"]}'
                  f'  truncated: {b["truncated"]}')
        print(f'    depth: {b["frames_with_depth"]} frames  labels: {b["labels"]}, '
              f'fraction {b["label_fraction"]:.4f}')
        print(f'    camera centres: {b["camera_centres_bbox"]}  landmarks: {b["landmarks_bbox"]}')
    print(f'edges ({summary["edges_source"]}): ' + ', '.join(f'{k} {n}' for k, n in summary['edges'].items()))
    print(f'scene extent: camera centres {summary["camera_centres_bbox"]}, landmarks {summary["landmarks_bbox"]}')
    return 0


def bench_read(paths, **kwargs) -> float:
    """Read bags (decode everything, no progress bar); print and return frames per second (wall clock).

    CPU seconds are printed too: on a shared machine they show the reader's own cost.
    """
    kwargs.setdefault('progress', False)
    t0, c0 = time.perf_counter(), time.process_time()
    sequences = read_bags(paths, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(s.frames) for s in sequences)
    h, w = sequences[0].frames[0].image.shape[:2]
    print(f'read+decode {n} frames ({w}x{h}): {wall:.2f} s wall, {n / wall:.0f} frames/s; '
          f'{cpu:.2f} s CPU, {n / cpu:.0f} frames per CPU second')
    return n / wall


if __name__ == '__main__':
    ap = argparse.ArgumentParser(prog='python -m globloc.bags', description='bag read benchmark')
    ap.add_argument('--bench', nargs='+', required=True, metavar='PATH', help='bags to read')
    bench_read(ap.parse_args().bench)
