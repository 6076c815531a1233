"""The bag layer: read and write the rosbag2 data contract (METHOD.md section 5), and `globloc info`.

Reading needs no ROS install: `rosbags` deserialises the messages (types from `Stores.ROS2_KILTED`,
whose definitions of the contract's standard messages equal Humble's, plus our
`globloc_msgs/msg/PoseGraphEdge` from `globloc/msg/`).

    seqs = read_bags(['data/scene'])                 # one Sequence per bag, sorted order = sequence id
    frame = seqs[0].frames[0]                        # image (H, W, 3) RGB, K, T_map_cam, depth, landmarks

Frames are built around the images: each image is matched by header stamp (within `tolerance_ns`) to a
pose, a CameraInfo (or the only one, if latched once), and optionally depth and landmarks. Nothing is
interpolated; images without a pose or calibration are dropped and counted per reason in the
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
import json
import struct
import sys
import time
import warnings
from collections import Counter, defaultdict
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

from globloc_ros import frames as fr
from globloc_ros import imgmsg

EDGE_MSGTYPE = 'globloc_msgs/msg/PoseGraphEdge'
EDGE_MSG_FILE = Path(__file__).with_name('msg') / 'PoseGraphEdge.msg'
DEPTH_ENCODINGS = tuple(imgmsg.DEPTH_ENCODINGS)
_MCAP_MAGIC = b'\x89MCAP0\r\n'
_STORAGE_SUFFIXES = ('.mcap', '.db3')


class BagError(RuntimeError):
    """A bag that cannot be read as the data contract; the message names file, topic and stamp."""


@dataclass(frozen=True)
class Topics:
    """Topic names of the data contract.

    Images come from `image` when the bag has it, else from `compressed`. `odometry`, when set, replaces
    `pose` by a nav_msgs/Odometry topic (its pose, T_map_cam of the optical frame, is used).
    """
    image: str = '/camera/image_raw'
    compressed: str = '/camera/image_raw/compressed'
    camera_info: str = '/camera/camera_info'
    depth: str = '/camera/depth/image_raw'
    pose: str = '/globloc/gt_pose'
    odometry: str | None = None
    landmarks: str = '/globloc/landmarks'
    graph: str = '/globloc/pose_graph'


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


@dataclass(frozen=True)
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
class Sequence:
    """The frames of one bag. edges: the bag's PoseGraphEdge messages, None when it has no graph topic."""
    path: Path
    seq: int
    frames: list[Frame]
    report: ReadReport
    edges: list[EdgeRecord] | None = None


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


def _storage_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in _STORAGE_SUFFIXES)


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
            mcaps = [path] if path.is_file() else [f for f in _storage_files(path) if f.suffix == '.mcap']
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
def _nearest(sorted_stamps: np.ndarray, stamp: int, tolerance_ns: int) -> int | None:
    """Index of the stamp nearest to `stamp` if within tolerance, else None."""
    if sorted_stamps.size == 0:
        return None
    i = int(np.searchsorted(sorted_stamps, stamp))
    best = None
    for k in (i - 1, i):
        if 0 <= k < sorted_stamps.size and abs(int(sorted_stamps[k]) - stamp) <= tolerance_ns:
            if best is None or abs(int(sorted_stamps[k]) - stamp) < abs(int(sorted_stamps[best]) - stamp):
                best = k
    return best


class _ByStamp:
    """Decoded messages of one topic, looked up by header stamp."""

    def __init__(self, items: list[tuple[int, object]]):
        items.sort(key=lambda x: x[0])
        self.stamps = np.array([s for s, _ in items], dtype=np.int64)
        self.msgs = [m for _, m in items]

    def __len__(self) -> int:
        return len(self.msgs)

    def get(self, stamp: int, tolerance_ns: int):
        k = _nearest(self.stamps, stamp, tolerance_ns)
        return None if k is None else self.msgs[k]


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
                  max_frames: int | None = None, progress: bool = True) -> Sequence:
    """Read one bag (a rosbag2 folder, or an .mcap / .db3 file) into a Sequence.

    size: (W, H) to resize every frame to (K scaled with the pixel-centre rule, depth nearest, landmark
    u, v scaled), None keeps the stored size. label_fraction in (0, 1]: stored landmarks are subsampled
    to at most label_count(...) per frame; frames without landmarks but with depth get that many labels
    drawn from depth. Both draws depend only on (seed, frame stamp). max_frames: keep the first N frames.
    Raises BagError (file, topic, stamp in the message) when the bag cannot be read as the contract.
    """
    path = Path(path)
    check_label_fraction(label_fraction)
    store = typestore()
    report = ReadReport(path)
    src = _Messages(path, report)
    try:
        present = src.topics
        listing = ', '.join(f'{t} ({present[t]})' for t in sorted(present)) or 'none'
        if report.truncated:
            listing += ' (' + '; '.join(report.warnings) + ')'

        def require(topic: str, what: str) -> None:
            if topic not in present:
                raise BagError(f'{path}: {what} topic {topic!r} not in bag; topics present: {listing}')

        image_topic = topics.image if topics.image in present else topics.compressed
        if image_topic not in present:
            raise BagError(f'{path}: no image topic ({topics.image!r} or {topics.compressed!r}) in bag; '
                           f'topics present: {listing}')
        pose_topic = topics.odometry or topics.pose
        require(pose_topic, 'odometry' if topics.odometry else 'pose')
        require(topics.camera_info, 'camera_info')
        wanted = {image_topic: 'image', pose_topic: 'pose', topics.camera_info: 'camera_info'}
        for topic, role in ((topics.depth, 'depth'), (topics.landmarks, 'landmarks'), (topics.graph, 'graph')):
            if topic in present:
                wanted[topic] = role
        roles = set(wanted.values())

        raw: dict[str, list] = defaultdict(list)
        counts: Counter = Counter()
        total = sum(src.totals.get(t, 0) for t in wanted)
        bar = tqdm(total=total, desc=path.name, unit='msg', disable=not progress, leave=False)
        for topic, log_ns, data in src.messages(set(wanted)):
            bar.update(1)
            counts[topic] += 1
            msgtype = present[topic]
            try:
                msg = store.deserialize_cdr(data, msgtype)
            except Exception as e:  # noqa: BLE001 - any decoder failure means this one message is corrupt
                report.corrupt.append(f'{path}: {topic} message at log time {_fmt_stamp(log_ns)} does not '
                                      f'deserialise as {msgtype} ({type(e).__name__}: {e})')
                continue
            stamp = log_ns if wanted[topic] == 'graph' else _stamp(msg.header.stamp)
            raw[wanted[topic]].append((stamp, msg))
        bar.close()
        report.counts = {t: counts.get(t, 0) for t in wanted}

        edges = None
        if 'graph' in roles:
            edges = _edge_records(raw.pop('graph', []), path, topics.graph, report)
        images = sorted(raw['image'], key=lambda x: x[0])
        poses, infos = _ByStamp(raw['pose']), _ByStamp(raw['camera_info'])
        depths, lms = _ByStamp(raw['depth']), _ByStamp(raw['landmarks'])
        latched_info = infos.msgs[0] if len(infos) == 1 else None

        frames: list[Frame] = []
        unmatched: Counter = Counter()
        missing: Counter = Counter()
        sources: set[str] = set()
        previous = None
        for stamp, img_msg in images:
            if max_frames is not None and len(frames) >= max_frames:
                break
            where = f'{path}: {image_topic} at stamp {_fmt_stamp(stamp)}'
            if stamp == previous:
                unmatched['duplicate image stamp'] += 1
                continue
            previous = stamp
            pose_msg = poses.get(stamp, tolerance_ns)
            info = latched_info or infos.get(stamp, tolerance_ns)
            if pose_msg is None:
                unmatched[f'no {pose_topic} within {tolerance_ns / 1e6:g} ms'] += 1
                continue
            if info is None:
                unmatched[f'no {topics.camera_info} within {tolerance_ns / 1e6:g} ms'] += 1
                continue
            try:
                image = _decode_image(img_msg, where)
                pose = pose_msg.pose.pose if present[pose_topic].endswith('Odometry') else pose_msg.pose
                T = _pose_of(pose, f'{path}: {pose_topic} at stamp {_fmt_stamp(_stamp(pose_msg.header.stamp))}')
                depth = landmarks = None
                if 'depth' in roles:
                    depth_msg = depths.get(stamp, tolerance_ns)
                    if depth_msg is None:
                        missing[topics.depth] += 1
                    else:
                        dwhere = f'{path}: {topics.depth} at stamp {_fmt_stamp(stamp)}'
                        depth = decode_depth(depth_msg, dwhere)
                        if depth.shape != image.shape[:2]:
                            raise BagError(f'{dwhere}: depth is {depth.shape[1]}x{depth.shape[0]} but the image '
                                           f'is {image.shape[1]}x{image.shape[0]} (must be registered to it)')
                if 'landmarks' in roles:
                    lm_msg = lms.get(stamp, tolerance_ns)
                    if lm_msg is None:
                        missing[topics.landmarks] += 1
                    else:
                        landmarks = decode_landmarks(lm_msg, f'{path}: {topics.landmarks} at stamp '
                                                             f'{_fmt_stamp(stamp)}')
            except ValueError as e:
                report.corrupt.append(str(e))
                continue
            K = _intrinsics(info, f'{path}: {topics.camera_info} for image stamp {_fmt_stamp(stamp)}',
                            image.shape[:2])
            frame = Frame(seq=seq, index=len(frames), stamp_ns=stamp, image=image, K=K, T_map_cam=T,
                          depth=depth, landmarks=landmarks, frame_id=img_msg.header.frame_id)
            if size is not None:
                _resize(frame, size)
            h, w = frame.image.shape[:2]
            if frame.landmarks is not None:
                frame.landmarks = subsample_labels(frame.landmarks, label_count(label_fraction, w, h),
                                                   label_rng(seed, stamp))
                sources.add('landmarks')
            elif frame.depth is not None:
                frame.landmarks = labels_from_depth(frame.depth, frame.K, frame.T_map_cam, label_fraction,
                                                    label_rng(seed, stamp))
                sources.add('depth')
            frames.append(frame)
    finally:
        src.close()

    report.matched = len(frames)
    report.unmatched = dict(unmatched)
    report.missing = dict(missing)
    report.labels = '+'.join(sorted(sources, reverse=True)) or 'none'
    for line in report.corrupt[:3] + report.warnings:
        warnings.warn(line, stacklevel=2)
    if not frames:
        why = '; '.join([*(f'{r}: {n}' for r, n in unmatched.items()), *report.corrupt[:3], *report.warnings])
        raise BagError(f'{path}: no readable frames ({len(images)} images on {image_topic}; {why or "empty"})')
    return Sequence(path=path, seq=seq, frames=frames, report=report, edges=edges)


def _edge_records(items: list, path: Path, topic: str, report: ReadReport) -> list[EdgeRecord]:
    out = []
    for log_ns, m in items:
        try:
            T = _pose_of(m.relative_pose, f'{path}: {topic} at log time {_fmt_stamp(log_ns)}')
        except ValueError as e:
            report.corrupt.append(str(e))
            continue
        out.append(EdgeRecord(seq_i=int(m.seq_i), stamp_i_ns=_stamp(m.stamp_i), seq_j=int(m.seq_j),
                              stamp_j_ns=_stamp(m.stamp_j), kind=int(m.kind), T_i_j=T,
                              covariance=np.asarray(m.covariance, dtype=np.float64).reshape(6, 6).copy()))
    return out


def bag_paths(paths: Iterable) -> list[Path]:
    """Expand bag folders, .mcap/.db3 files and folders of bag folders into bag paths (sorted per folder)."""
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise BagError(f'{p}: no such bag (file or folder does not exist)')
        if p.is_dir() and not (p / 'metadata.yaml').exists():
            inner = sorted(c for c in p.iterdir()
                           if c.is_dir() and ((c / 'metadata.yaml').exists() or _storage_files(c)))
            if inner:
                out += inner
                continue
        out.append(p)
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
def scene_summary(sequences: list[Sequence]) -> dict:
    """Counts and extents of sequences read by read_bags, as a JSON-friendly dict (what `globloc info` prints)."""
    from globloc import graph  # graph imports this module

    explicit = graph.edges_from_bags(sequences)
    edges = explicit if explicit is not None else graph.derive_edges(sequences)
    out = {'bags': [], 'edges_source': 'explicit' if explicit is not None else 'derived',
           'edges': graph.edge_counts(edges)}
    centres_all, points_all = [], []
    for s in sequences:
        centres = np.array([f.T_map_cam[:3, 3] for f in s.frames])
        lms = [f.landmarks for f in s.frames if f.landmarks is not None]
        points = np.concatenate(lms)[:, :3] if lms else np.zeros((0, 3))
        pixels = sum(f.image.shape[0] * f.image.shape[1] for f in s.frames)
        h, w = s.frames[0].image.shape[:2]
        stamps = [f.stamp_ns for f in s.frames]
        out['bags'].append({
            'path': str(s.path), 'seq': s.seq, 'size': f'{w}x{h}', 'messages': s.report.counts,
            'matched_frames': s.report.matched, 'dropped': s.report.unmatched, 'frames_without': s.report.missing,
            'corrupt': len(s.report.corrupt), 'truncated': s.report.truncated,
            'frames_with_depth': sum(f.depth is not None for f in s.frames),
            'labels': s.report.labels, 'label_fraction': sum(len(x) for x in lms) / pixels,
            'time_span_s': (max(stamps) - min(stamps)) / 1e9, 'camera_centres_bbox': _bbox(centres),
            'landmarks_bbox': _bbox(points)})
        centres_all.append(centres)
        points_all.append(points)
    out['camera_centres_bbox'] = _bbox(np.concatenate(centres_all))
    out['landmarks_bbox'] = _bbox(np.concatenate(points_all))
    return out


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
    sequences = read_bags(args.paths, size=args.size, label_fraction=args.label_fraction,
                          tolerance_ns=int(args.tolerance_ms * 1e6), progress=sys.stderr.isatty())
    summary = scene_summary(sequences)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for s, b in zip(sequences, summary['bags']):
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
