"""Training data: bag frames -> tensors at the network's input size, and the (anchor, adjacent, distant) tuple sampler.

Frames are read at their stored size (so `label_fraction` is a fraction of the *recorded* image's pixels, as in
the paper's "< 1 % labelled pixels"), then resized once to the network input size:
- images with cv2.INTER_AREA (downscaling) / INTER_LINEAR, K with frames.scale_intrinsics (pixel-centre rule);
- labels (x, y, z, u, v): u, v moved with the same pixel-centre rule, so they stay in input-image pixels; a bag
  with neither landmarks nor depth gets them triangulated between its frames from the poses (triangulate_labels);
- depth sampled at the stride-s cell centres (bilinear over the four nearest recorded pixels, invalid when any of
  them is invalid or they straddle a depth edge), which is exactly what the depth head predicts.

Augmentation keeps the geometry exact: photometric jitter; zoom and in-plane rotation (`warp_batch`, K and pose
adjusted); novel views (`view_warp_batch`: the frame re-rendered from its depth for a moved camera).

Sampling is a pure function of (seed, step): `TupleSampler.tuples(step, batch)` and the `*_params(seed, step, n)`
functions draw from np.random.default_rng([seed, step, ...]). That makes resuming exact and lets each distributed
rank take its slice of the same global batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import roma
import torch
from torch.nn import functional as F

from globloc import bags as bg
from globloc import graph as gr
from globloc_ros import frames as fr
from globloc_ros import placemap as pm


@dataclass
class TrainData:
    """All training frames as tensors at the network input size (W, H), stride-s cell grid (h, w).

    images (N, 3, H, W) uint8 RGB; K (N, 3, 3) float32 of the input-size image; T_map_cam (N, 4, 4) float32 (metres);
    depth (N, h, w) float32 metres at cell centres, NaN invalid; depth_full (N, H, W) the same at every input
    pixel (for geometric augmentation); labels (N, M, 5) float32 x y z (map, metres) u v
    (input pixels), padded; label_mask (N, M) bool; seq (N,) int64 sequence id; edges: graph edges over the global
    frame index; edges_source: 'explicit' (from the bags' graph topic) or 'derived'; paths: the bag paths.
    """
    images: torch.Tensor
    K: torch.Tensor
    T_map_cam: torch.Tensor
    depth: torch.Tensor
    depth_full: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    seq: torch.Tensor
    edges: list
    edges_source: str
    paths: list[str]
    input_size: tuple[int, int]
    stride: int
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]


def parse_size(text: str | tuple | list) -> tuple[int, int]:
    """'WxH' or (W, H) -> (W, H); W and H must be positive multiples of 8 (the output stride)."""
    if isinstance(text, str):
        try:
            w, h = (int(x) for x in text.lower().split('x'))
        except ValueError:
            raise ValueError(f'input size must be WxH, e.g. 160x120, got {text!r}') from None
    else:
        w, h = (int(x) for x in text)
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise ValueError(f'input size {w}x{h}: width and height must be positive multiples of 8 (the stride)')
    return w, h


def resize_frame(image: np.ndarray, K: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """image (h0, w0, 3) uint8, K (3, 3) -> image (H, W, 3), K of it, and the scale factors (sx, sy)."""
    W, H = size
    h0, w0 = image.shape[:2]
    sx, sy = W / w0, H / h0
    if (W, H) != (w0, h0):
        interp = cv2.INTER_AREA if sx < 1 and sy < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (W, H), interpolation=interp)
    return image, fr.scale_intrinsics(K, sx, sy), sx, sy


def parse_split(split: str) -> int:
    """'all' -> 1, 'every:K' -> K: the frames whose index in their bag is a multiple of K."""
    if split == 'all':
        return 1
    if split.startswith('every:'):
        try:
            k = int(split.split(':', 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ValueError(f"a split must be 'all' or 'every:K' with K >= 1, got {split!r}")


def holdout_every(holdout: str | None) -> int | None:
    """--holdout 'every:K' -> K (>= 2): leave out the frames whose index is a multiple of K; None -> None."""
    every = parse_split(holdout) if holdout else None
    if every == 1:
        raise ValueError(f'--holdout must be every:K with K >= 2, got {holdout!r}')
    return every


def training_bags(bag_args) -> list[Path]:
    """Bag paths (folders, files, or a folder of bag folders); ValueError when there are none."""
    paths = bg.bag_paths(bag_args)
    if not paths:
        raise ValueError(f'no bags found in {list(map(str, bag_args))}')
    return paths


def load_sequences(bag_args, label_fraction: float, seed: int = 0, max_frames: int | None = None,
                   progress: bool = False, topics: bg.Topics = bg.Topics(),
                   holdout: str | None = None) -> list[bg.Sequence]:
    """Read bags (folders, files, or a folder of bag folders) at their stored size; clear errors for bad input.
    holdout 'every:K': leave out the frames `globloc eval --split every:K` scores (index a multiple of K).
    All frames in memory: for a long recording, stream_bags."""
    bg.check_label_fraction(label_fraction)
    every = holdout_every(holdout)
    sequences = [bg.read_sequence(p, seq=i, topics=topics, label_fraction=label_fraction, seed=seed,
                                  max_frames=max_frames, progress=progress)
                 for i, p in enumerate(training_bags(bag_args))]
    if every:
        for s in sequences:
            s.frames = [f for f in s.frames if f.index % every]
    return sequences


def stream_bags(bag_args, label_fraction: float, seed: int = 0, max_frames: int | None = None,
                progress: bool = False, topics: bg.Topics = bg.Topics(),
                holdout: str | None = None) -> Iterator[tuple[bg.BagReader, Iterator[bg.Frame]]]:
    """load_sequences as a stream: for each bag, its BagReader (report and edges complete once its frames are
    exhausted) and its frames, the held-out ones left out; one frame in memory at a time."""
    bg.check_label_fraction(label_fraction)
    every = holdout_every(holdout)
    for i, p in enumerate(training_bags(bag_args)):
        reader = bg.BagReader(p, seq=i, topics=topics, label_fraction=label_fraction, seed=seed,
                              max_frames=max_frames, progress=progress)
        yield reader, (f for f in reader if not every or f.index % every)


# Triangulated labels: ORB features per frame, twice the label budget (about a third come out as labels), at least
# MIN_TRIANGULATION_FEATURES and at most MAX_TRIANGULATION_FEATURES (matching costs grow with the square). A feature
# triangulated in several frame pairs keeps the median point when they agree within LABEL_AGREEMENT of its distance
# from the camera, else none: a wrong match along the epipolar line (repeated facade windows) passes the reprojection
# tests but rarely gives the same point twice.
MIN_TRIANGULATION_FEATURES, MAX_TRIANGULATION_FEATURES = 500, 5000
LABEL_AGREEMENT = 0.02


def triangulation_view(image: np.ndarray, K: np.ndarray, T_map_cam: np.ndarray,
                       label_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One recorded frame's ORB features for triangulate_labels: (uv (n, 2) recorded pixels, descriptors (n, 32)
    uint8, K, T_map_cam), twice its label budget of features (within the *_TRIANGULATION_FEATURES bounds)."""
    h, w = image.shape[:2]
    n = min(MAX_TRIANGULATION_FEATURES, max(MIN_TRIANGULATION_FEATURES, 2 * bg.label_count(label_fraction, w, h)))
    kps, des = pm.orb(n).detectAndCompute(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), None)
    uv = np.array([k.pt for k in kps], np.float64).reshape(-1, 2)
    return uv, np.zeros((0, 32), np.uint8) if des is None else des, K, T_map_cam


def triangulated_labels(views: list, stamps: list[int], sizes: list[tuple[int, int]], label_fraction: float,
                        seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """Labels triangulated between frames (see triangulate_labels) from their triangulation_view's, stamps (ns) and
    recorded sizes (W, H): per frame (M, 5) float32 (x, y, z, u, v) rows, and the summary dict."""
    X, _, src = pm.triangulate_features(views, with_sources=True)
    order = np.lexsort((src[:, 1], src[:, 0]))  # the rows of one (frame, feature) next to each other
    X, src = X[order], src[order]
    first = np.flatnonzero(np.r_[True, np.any(src[1:] != src[:-1], axis=1)]) if len(src) else np.zeros(0, int)
    groups = list(zip(first, np.r_[first[1:], len(src)]))
    points = np.array([np.median(X[a:b], 0) for a, b in groups]).reshape(-1, 3)
    spread = np.array([np.linalg.norm(X[a:b] - p, axis=1).max() for (a, b), p in zip(groups, points)])
    frame_of, feature_of = src[first].T
    centres = np.array([T[:3, 3] for *_, T in views])
    agree = spread <= LABEL_AGREEMENT * np.linalg.norm(points - centres[frame_of], axis=1)
    labels, counts, errors, pixels = [], [], [], 0
    for k, ((uv_k, _, K, T), stamp, (w, h)) in enumerate(zip(views, stamps, sizes)):
        pixels += h * w
        mine = agree & (frame_of == k)
        lm = np.column_stack([points[mine], uv_k[feature_of[mine]]]).astype(np.float32)
        lm = bg.subsample_labels(lm, bg.label_count(label_fraction, w, h), bg.label_rng(seed, stamp))
        if len(lm):
            uv, _ = fr.project((lm[:, :3].astype(np.float64) - T[:3, 3]) @ T[:3, :3], K)
            errors.append(np.linalg.norm(uv - lm[:, 3:], axis=1))
        labels.append(lm)
        counts.append(len(lm))
    err = np.concatenate(errors) if errors else np.zeros(0)
    return labels, {'frames': len(views), 'frames_with_labels': int(np.count_nonzero(counts)),
                    'labels': int(sum(counts)),
                    'labels_per_frame': [int(np.min(counts)), float(np.median(counts)), int(np.max(counts))],
                    'label_fraction': sum(counts) / pixels,
                    'reprojection_px': [float(np.median(err)), float(np.percentile(err, 90))] if len(err) else None}


def triangulate_labels(sequences: list[bg.Sequence], label_fraction: float, seed: int = 0) -> dict | None:
    """Sparse labels for the frames that have neither landmarks nor depth (a plain camera with a motion-capture or
    SfM trajectory), triangulated from the images and their poses by the place map's own triangulation
    (placemap.triangulate_features: ORB features matched between frames with wide baselines and similar viewing
    directions; a point is kept when it reprojects within TRIANGULATION_ERROR_PX in both frames and the rays meet
    at MIN_PARALLAX_DEG or more). The frames of all sequences are triangulated together (one place, one map frame).

    A feature triangulated in several pairs becomes one label, at their median point, when they agree
    (LABEL_AGREEMENT). Each frame gets at most label_count(label_fraction, W, H) labels, (M, 5) float32 rows
    (x, y, z, u, v): the map-frame point (metres) and the recorded-image pixel of the feature that sees it.
    Sets frame.landmarks, and report.labels gains 'triangulated'. Returns None when no frame lacked labels, else
    {'frames', 'frames_with_labels', 'labels', 'labels_per_frame' (min, median, max), 'label_fraction' (of the
    recorded pixels), 'reprojection_px' (median, p90): each label's point projected with its own frame's pose and
    K, against its pixel}.
    """
    todo = [(s, f) for s in sequences for f in s.frames if f.landmarks is None and f.depth is None]
    if not todo:
        return None
    views = [triangulation_view(f.image, f.K, f.T_map_cam, label_fraction) for _, f in todo]
    labels, summary = triangulated_labels(views, [f.stamp_ns for _, f in todo],
                                          [f.image.shape[1::-1] for _, f in todo], label_fraction, seed)
    for (s, f), lm in zip(todo, labels):
        if len(lm):
            f.landmarks = lm
            if 'triangulated' not in s.report.labels:
                s.report.labels = '+'.join(x for x in (s.report.labels, 'triangulated') if x != 'none')
    return summary


def frame_arrays(f: bg.Frame, input_size: tuple[int, int], stride: int = 8) -> tuple[np.ndarray, ...]:
    """One recorded frame at the network input size (W, H): image (H, W, 3) uint8, K (3, 3) of it, depth at the
    stride cells (H/s, W/s) and at every pixel (H, W) float32 metres (NaN: none), labels (m, 5) float32 x y z u v
    with u, v in input pixels (the finite ones inside the image)."""
    W, H = input_size
    img, K, sx, sy = resize_frame(f.image, f.K, input_size)
    if f.depth is not None:
        depth = fr.depth_at_cells(f.depth, sx, sy, H // stride, W // stride, stride)
        depth_full = fr.depth_at_cells(f.depth, sx, sy, H, W, 1)
    else:
        depth = np.full((H // stride, W // stride), np.nan, np.float32)
        depth_full = np.full((H, W), np.nan, np.float32)
    return img, K, depth, depth_full, labels_at_input(f.landmarks, sx, sy, input_size)


def labels_at_input(landmarks: np.ndarray | None, sx: float, sy: float, input_size: tuple[int, int]) -> np.ndarray:
    """Labels (m, 5) x y z u v in recorded pixels (or None) -> (m', 5) float32 in input pixels (W, H), scaled by
    (sx, sy) with the pixel-centre rule; the finite ones inside the image."""
    W, H = input_size
    lm = np.zeros((0, 5), np.float32) if landmarks is None else np.asarray(landmarks, np.float32)
    lm = lm[np.all(np.isfinite(lm), 1)].copy()
    lm[:, 3] = (lm[:, 3] + 0.5) * sx - 0.5
    lm[:, 4] = (lm[:, 4] + 0.5) * sy - 0.5
    inside = (lm[:, 3] > -0.5) & (lm[:, 3] < W - 0.5) & (lm[:, 4] > -0.5) & (lm[:, 4] < H - 0.5)
    return lm[inside]


def no_labels_error(paths) -> ValueError:
    return ValueError(f'no frame has 3D labels (no landmarks topic, no depth, and none triangulated between the '
                      f'frames from their poses in {[str(p) for p in paths]}): scene-coordinate training '
                      f'needs at least sparse labels')


def build_train_data(sequences: list[bg.Sequence], input_size: tuple[int, int], stride: int = 8,
                     need_labels: bool = True) -> TrainData:
    """Sequences -> TrainData at `input_size` (W, H), in memory (globloc.cache writes the same arrays to disk).
    Raises ValueError when frames lack what training needs."""
    W, H = input_size
    h, w = H // stride, W // stride
    frames = [f for s in sequences for f in s.frames]
    if not frames:
        raise ValueError('the bags hold no frames')
    n = len(frames)
    images = np.empty((n, H, W, 3), np.uint8)
    Ks = np.empty((n, 3, 3), np.float32)
    Ts = np.empty((n, 4, 4), np.float32)
    depth = np.empty((n, h, w), np.float32)
    depth_full = np.empty((n, H, W), np.float32)
    label_list = []
    for k, f in enumerate(frames):
        if not np.all(np.isfinite(f.T_map_cam)):
            raise ValueError(f'{sequences[f.seq].path}: frame {f.index} has a non-finite pose')
        images[k], Ks[k], depth[k], depth_full[k], lm = frame_arrays(f, input_size, stride)
        Ts[k] = f.T_map_cam
        label_list.append(lm)
    m = max(len(x) for x in label_list)
    n_labelled = sum(len(x) > 0 for x in label_list)
    if need_labels and n_labelled == 0:
        raise no_labels_error([s.path for s in sequences])
    labels = np.zeros((n, max(m, 1), 5), np.float32)
    mask = np.zeros((n, max(m, 1)), bool)
    for k, lm in enumerate(label_list):
        labels[k, :len(lm)] = lm
        mask[k, :len(lm)] = True
    edges, source = gr.scene_edges(sequences)
    stats = {'frames': n, 'frames_per_sequence': [len(s.frames) for s in sequences],
             'frames_with_depth': int(sum(f.depth is not None for f in frames)),
             'frames_with_labels': int(n_labelled), 'labels_per_frame_mean': float(mask.sum() / n),
             'recorded_size': [int(frames[0].image.shape[1]), int(frames[0].image.shape[0])],
             'edges': gr.edge_counts(edges), 'edges_source': source}
    return TrainData(images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), K=torch.from_numpy(Ks),
                     T_map_cam=torch.from_numpy(Ts), depth=torch.from_numpy(depth),
                     depth_full=torch.from_numpy(depth_full), labels=torch.from_numpy(labels),
                     label_mask=torch.from_numpy(mask), seq=torch.tensor([f.seq for f in frames], dtype=torch.int64),
                     edges=edges, edges_source=source, paths=[str(s.path) for s in sequences],
                     input_size=(W, H), stride=stride, stats=stats)


NORMALISATION_CHUNK = 256  # frames (at 640x480 and 0.5 % labels, 10 MB of float64 points)


def scene_normalisation(data: TrainData) -> dict:
    """NetConfig fields from the training data: scene_centre, scene_scale (m), depth_min/scale/max (m).

    Centre = mean of the camera centres and label points; scale = RMS distance of those from the centre, so the
    scene head's raw output is about unit size. Depth range from the depth cells, or the labels' camera-frame z
    when there is no depth: depth_scale puts softplus(0) near the median depth, depth_max well above the largest.
    """
    # The labels a chunk of frames at a time: a long recording's (memory-mapped) never all in memory as float64.
    chunks = [slice(a, a + NORMALISATION_CHUNK) for a in range(0, len(data), NORMALISATION_CHUNK)]

    def labels_of(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, 3) float64 map points of the frames' labels and (L,) the frame of each (a global index)."""
        mask = data.label_mask[rows]
        return data.labels[rows][mask][:, :3].double(), torch.nonzero(mask)[:, 0] + rows.start

    centres = data.T_map_cam[:, :3, 3].double()
    total, count = centres.sum(0), len(centres)
    for rows in chunks:
        X, _ = labels_of(rows)
        total, count = total + X.sum(0), count + len(X)
    centre = total / count
    squares = (centres - centre).square().sum()
    for rows in chunks:
        squares = squares + (labels_of(rows)[0] - centre).square().sum()
    scale = float(torch.sqrt(squares / count).clamp(min=1e-3))
    d = data.depth[torch.isfinite(data.depth)].double()
    if d.numel() == 0:  # camera-frame depth of the labels: z = (X - t) . (third column of R)
        axes = data.T_map_cam[:, :3, 2].double()
        zs = []
        for rows in chunks:
            X, frame = labels_of(rows)
            z = ((X - centres[frame]) * axes[frame]).sum(1)
            zs.append(z[z > 0])
        d = torch.cat(zs)
    if d.numel() == 0:
        raise ValueError('cannot infer the depth range: no valid depth and no label in front of its camera')
    med, top = float(d.median()), float(torch.quantile(d.float()[:1_000_000], 0.999))
    depth_min = max(0.01, 0.25 * float(d.min()))
    return {'scene_centre': tuple(float(x) for x in centre), 'scene_scale': scale, 'depth_min': depth_min,
            'depth_scale': max((med - depth_min) / float(np.log(2.0)), 1e-2), 'depth_max': 1.5 * top}


class TupleSampler:
    """Tuples (anchor, adjacent partner, distant partner) drawn from the graph edges.

    Anchors are the frames that have at least one edge of each kind; for each tuple one adjacent and one distant
    edge of the anchor are picked uniformly. `tuples(step, batch)` depends only on (seed, step).
    When no frame has both kinds (one short sequence in which nothing comes back near where it was, e.g. a few dozen
    stills walked around a building), every frame with an edge is an anchor and a slot whose kind the anchor lacks
    takes an edge of the other kind; `fallback` then says so (None otherwise).
    """

    def __init__(self, n_frames: int, edges: list, seed: int):
        self.seed = int(seed)
        self.n_frames = n_frames
        T = np.stack([e.T_i_j for e in edges]).astype(np.float64) if edges else np.zeros((0, 4, 4))
        self.T_i_j = T
        self.T_j_i = fr.invert_pose(T) if len(T) else T
        inc = {gr.ADJACENT: [[] for _ in range(n_frames)], gr.DISTANT: [[] for _ in range(n_frames)]}
        for k, e in enumerate(edges):
            if e.kind in inc and e.i != e.j:
                inc[e.kind][e.i].append((e.j, k, 0))  # partner, edge, direction 0: T_anchor_partner = T_i_j
                inc[e.kind][e.j].append((e.i, k, 1))  # direction 1: the inverse
        self.incident = {kind: [np.array(x, dtype=np.int64).reshape(-1, 3) for x in lists]
                         for kind, lists in inc.items()}
        self.anchors = np.array([i for i in range(n_frames) if len(self.incident[gr.ADJACENT][i])
                                 and len(self.incident[gr.DISTANT][i])], dtype=np.int64)
        counts = gr.edge_counts(edges)
        self.fallback = None
        if len(self.anchors) == 0:
            self.anchors = np.array([i for i in range(n_frames) if len(self.incident[gr.ADJACENT][i])
                                     or len(self.incident[gr.DISTANT][i])], dtype=np.int64)
            self.fallback = (f'no frame has both an adjacent and a distant edge ({counts["adjacent"]} adjacent, '
                             f'{counts["distant"]} distant): each tuple takes both partners from the kind its anchor '
                             f'has')
        if len(self.anchors) == 0:
            raise ValueError(f'too few frames for the graph: {n_frames} frames and no edge between them (tuples '
                             f'need an anchor with partners; give more or longer sequences)')

    def tuples(self, step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch, 3) frame indices (anchor, adjacent, distant) and (batch, 2, 4, 4) float64 measured relative
        poses T_anchor_partner for the adjacent and distant partner."""
        rng = np.random.default_rng([self.seed, int(step), 1])
        anchors = self.anchors[rng.integers(0, len(self.anchors), size=batch)]
        idx = np.empty((batch, 3), np.int64)
        rel = np.empty((batch, 2, 4, 4), np.float64)
        idx[:, 0] = anchors
        for b, a in enumerate(anchors):
            for slot, kind in ((0, gr.ADJACENT), (1, gr.DISTANT)):
                cand = self.incident[kind][a]
                if not len(cand):  # only with self.fallback
                    cand = self.incident[gr.DISTANT if kind == gr.ADJACENT else gr.ADJACENT][a]
                partner, k, direction = cand[rng.integers(0, len(cand))]
                idx[b, slot + 1] = partner
                rel[b, slot] = self.T_j_i[k] if direction else self.T_i_j[k]
        return idx, rel

    def state(self) -> dict:
        """What makes the draw reproducible (stored in checkpoints and compared on resume)."""
        return {'seed': self.seed, 'n_frames': self.n_frames, 'anchors': int(len(self.anchors))}


def jitter_params(seed: int, step: int, n: int, strength: float) -> np.ndarray:
    """(n, 5) photometric jitter per image: brightness offset (0..255 units), contrast gain, three colour gains.

    Geometry is untouched (no warps), so labels, depth and K stay exact. strength 0 gives the identity.
    """
    rng = np.random.default_rng([int(seed), int(step), 2])
    p = np.empty((n, 5), np.float64)
    p[:, 0] = rng.uniform(-1, 1, n) * 40.0 * strength
    p[:, 1] = 1.0 + rng.uniform(-1, 1, n) * 0.4 * strength
    p[:, 2:] = 1.0 + rng.uniform(-1, 1, (n, 3)) * 0.15 * strength
    return p


def apply_jitter(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """images (B, 3, H, W) uint8 -> float (B, 3, H, W) on 0..255 with jitter params (B, 5) applied."""
    x = images.float()
    p = torch.as_tensor(params, dtype=torch.float32, device=x.device)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * p[:, 1, None, None, None] + mean + p[:, 0, None, None, None]
    x = x * p[:, 2:, None, None]
    return x.clamp(0.0, 255.0)


def batch_tensors(data: TrainData, idx: np.ndarray, device: torch.device | str = 'cpu') -> dict:
    """Gather frames (flat index array, any order) -> dict of tensors on `device` (images still uint8)."""
    t = torch.from_numpy(np.asarray(idx, np.int64).reshape(-1))
    return {'images': data.images[t].to(device), 'K': data.K[t].to(device), 'T': data.T_map_cam[t].to(device),
            'depth': data.depth[t].to(device), 'depth_full': data.depth_full[t].to(device),
            'labels': data.labels[t].to(device),
            'label_mask': data.label_mask[t].to(device)}


WARP_IDENTITY = (1.0, 0.0, 0.0, 0.0)  # a warp_params row that leaves its frame as it is


def warp_params(seed: int, step: int, n: int, max_scale: float, max_rotation_deg: float,
                max_shift: float = 0.0) -> np.ndarray:
    """(n, 4) per image: zoom factor s (log-uniform in [1/max_scale, max_scale]), in-plane rotation (rad, uniform
    in +-max_rotation_deg) and a shift of the image (and principal point) by up to +-max_shift of its width and
    height. max_scale 1, 0 degrees and shift 0 give the identity."""
    rng = np.random.default_rng([int(seed), int(step), 3])
    p = np.empty((n, 4), np.float64)
    p[:, 0] = np.exp(rng.uniform(-1, 1, n) * np.log(max(max_scale, 1.0)))
    p[:, 1] = np.radians(rng.uniform(-1, 1, n) * max_rotation_deg)
    p[:, 2:] = rng.uniform(-1, 1, (n, 2)) * max_shift
    return p


def keep_mask(seed: int, step: int, n: int, fraction: float) -> np.ndarray:
    """(n,) bool: the images of a step that skip the geometric and novel-view augmentation and are seen as
    recorded. Both leave black where the old view has no pixels (a border, disoccluded holes); a network that only
    ever saw such images sets its depth scale by them and misjudges recorded images, which have none."""
    return np.random.default_rng([int(seed), int(step), 5]).uniform(size=n) < fraction


def _rz(theta: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) rotations about the optical axis z."""
    c, s = torch.cos(theta), torch.sin(theta)
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).view(-1, 3, 3)


def warp_batch(batch: dict, params: np.ndarray, stride: int) -> tuple[dict, torch.Tensor]:
    """Geometric augmentation that keeps the geometry exact: a virtual camera rotated about its optical axis by
    theta, with focal lengths scaled by s (a zoom about the principal point) and its principal point shifted by
    (dx W, dy H) (the image content moves with it, as in a crop of a larger sensor).

    For the new camera c': X_c' = Rz(theta) X_c, so T_map_c' = T_map_c Rz^T, K' = K with fx, fy * s and cx, cy
    shifted, and a pixel maps as p' = K' Rz K^-1 p. Depth along the optical axis is unchanged under both, so the
    depth at a new cell is the old depth where that cell's ray was. Images are resampled bilinearly (black outside
    the original view), labels moved (and dropped when they leave the image), depth cells resampled from the
    full-resolution depth; frames with identity params stay exactly as they were. Returns the warped batch and
    T_c'_c (B, 4, 4) (rotation Rz), which the caller applies to relative poses: T_a'_p' = T_a'_a T_a_p T_p'_p^-1.
    """
    images, K = batch['images'], batch['K']
    B, _, H, W = images.shape
    p = torch.as_tensor(params, dtype=K.dtype, device=K.device)
    Rz = _rz(p[:, 1])
    K2 = K.clone()
    K2[:, 0, 0] *= p[:, 0]
    K2[:, 1, 1] *= p[:, 0]
    if p.shape[1] > 2:
        K2[:, 0, 2] += p[:, 2] * W
        K2[:, 1, 2] += p[:, 3] * H
    fwd = K2 @ Rz @ torch.linalg.inv(K)  # old pixel -> new pixel (affine: last row 0 0 1)
    back = torch.linalg.inv(fwd)

    def sample(maps: torch.Tensor, uv_new: torch.Tensor, mode: str) -> torch.Tensor:
        """maps (B, C, H, W) at input pixels; uv_new (B, N, 2) pixels of the new image -> (B, C, N)."""
        uv = uv_new @ back[:, :2, :2].transpose(1, 2) + back[:, None, :2, 2]
        grid = torch.stack([2 * uv[..., 0] / (W - 1) - 1, 2 * uv[..., 1] / (H - 1) - 1], -1)[:, :, None]
        return F.grid_sample(maps, grid, mode=mode, padding_mode='zeros', align_corners=True)[..., 0]

    pix = fr.cell_centres(H, W, 1, device=K.device, dtype=K.dtype)[None].expand(B, -1, -1)
    out = dict(batch)
    out['images'] = sample(images.to(K.dtype), pix, 'bilinear').view(B, 3, H, W)
    h, w = H // stride, W // stride
    cells = fr.cell_centres(h, w, stride, device=K.device, dtype=K.dtype)[None].expand(B, -1, -1)
    d = batch['depth_full'][:, None]
    valid = torch.isfinite(d).to(d.dtype)
    # Valid only where all four bilinear neighbours are (the mask then samples to exactly 1).
    dv = sample(torch.nan_to_num(d) * valid, cells, 'bilinear')[:, 0]
    mv = sample(valid, cells, 'bilinear')[:, 0]
    out['depth'] = torch.where(mv > 1 - 1e-4, dv / mv.clamp(min=1e-6), torch.full_like(dv, float('nan'))).view(B, h, w)
    lab = batch['labels'].clone()
    uv = lab[..., 3:5] @ fwd[:, :2, :2].transpose(1, 2) + fwd[:, None, :2, 2]
    lab[..., 3:5] = uv
    inside = (uv[..., 0] > -0.5) & (uv[..., 0] < W - 0.5) & (uv[..., 1] > -0.5) & (uv[..., 1] < H - 0.5)
    out['labels'], out['label_mask'] = lab, batch['label_mask'] & inside
    Rz4 = torch.eye(4, dtype=K.dtype, device=K.device).repeat(B, 1, 1)
    Rz4[:, :3, :3] = Rz
    out['T'] = batch['T'] @ Rz4.transpose(1, 2)
    out['K'] = K2
    same = (p[:, 0] == 1) & (p[:, 1:] == 0).all(1)  # identity params: the frame exactly as it was
    for key in ('images', 'depth', 'labels', 'label_mask'):
        out[key] = torch.where(same.view(-1, *[1] * (out[key].dim() - 1)), batch[key].to(out[key].dtype), out[key])
    return out, Rz4


def augment_moved(augment, batch: dict, params: np.ndarray, stride: int,
                  identity: tuple) -> tuple[dict, torch.Tensor]:
    """Run `augment` (warp_batch or view_warp_batch) on the frames whose params differ from `identity` only.
    The others come back as they were, bit for bit, as augment itself returns them; the warps treat each frame
    on its own, so the moved frames are the same as in a call on the whole batch. Kept frames (`keep_mask`) then
    cost nothing. Returns the batch and T_new_old (B, 4, 4), the identity for frames not moved."""
    B, device = batch['images'].shape[0], batch['K'].device
    idx = np.flatnonzero((params != np.asarray(identity)).any(1))
    if len(idx) == B:
        return augment(batch, params, stride)
    N = torch.eye(4, dtype=batch['K'].dtype, device=device).repeat(B, 1, 1)
    if len(idx) == 0:
        return batch, N
    moved = torch.from_numpy(idx).to(device)
    sub, N[moved] = augment({k: v[moved] for k, v in batch.items()}, params[idx], stride)
    out = {}
    for key, value in batch.items():
        out[key] = value.to(sub[key].dtype, copy=True)
        out[key][moved] = sub[key]
    return out, N


VIEW_MIN_DEPTH_FRACTION = 0.5  # frames with less valid depth than this are not moved (the warp needs depth)
VISIBLE_DEPTH_RATIO = 0.05  # a point is seen from the new camera when its depth matches the new depth map within 5 %
VIEW_IDENTITY = (0.0,) * 6  # a view_params row that leaves its frame as it is


def view_params(seed: int, step: int, n: int, max_translate: float, max_turn_deg: float) -> np.ndarray:
    """(n, 6) per image: a translation (camera frame, uniform in a ball of radius max_translate, in units of the
    frame's median depth) and a pan/tilt rotation vector (rad, about x and y, each uniform in +-max_turn_deg).
    Zeros (the identity) when both maxima are 0."""
    rng = np.random.default_rng([int(seed), int(step), 4])
    p = np.zeros((n, 6), np.float64)
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    p[:, :3] = direction * (rng.uniform(0, 1, (n, 1)) ** (1 / 3)) * max_translate
    p[:, 3:5] = np.radians(rng.uniform(-1, 1, (n, 2)) * max_turn_deg)
    return p


def cells_from_pixels(depth_full: torch.Tensor, stride: int) -> torch.Tensor:
    """depth_full (B, H, W) metres, NaN invalid -> (B, h, w) at the stride-s cell centres: the mean of the four
    pixels around each centre (s j + (s-1)/2 lies between pixels s j + s/2 - 1 and s j + s/2); NaN if any is
    invalid or they straddle a depth edge (as in depth_at_cells)."""
    c = stride // 2 - 1
    quad = torch.stack([depth_full[:, c + a::stride, c + b::stride] for a in (0, 1) for b in (0, 1)])
    lo, hi = quad.amin(0), quad.amax(0)  # NaN when any of the four is NaN
    return torch.where(hi - lo <= fr.DEPTH_EDGE_RATIO * lo, quad.mean(0), torch.nan)


def view_warp_batch(batch: dict, params: np.ndarray, stride: int) -> tuple[dict, torch.Tensor]:
    """Novel-view augmentation: each frame re-rendered from a virtual camera c' moved by (t, R) from its own,
    using its depth, so the network sees the place from positions the recording never visited.

    X_c' = R X_c + t with t = params[:, :3] times the frame's median depth and R = exp(params[:, 3:]);
    T_map_c' = T_map_c T_c'_c^-1, K unchanged. The depth map is forward-projected into c' with a z-buffer (one-pixel
    cracks closed by the nearest neighbour's depth); each new pixel then takes the colour where its ray meets the
    old image, if the old depth there agrees (otherwise it was hidden: black, no depth). Labels are moved with
    the camera and dropped where the new view does not see them. Frames with too little depth, or all-zero
    params, stay unchanged.
    Returns the new batch and T_c'_c (B, 4, 4), which the caller applies to relative poses:
    T_a'_p' = T_a'_a T_a_p T_p'_p^-1.
    """
    images, K, d = batch['images'], batch['K'], batch['depth_full']
    B, _, H, W = images.shape
    dt = K.dtype
    valid = torch.isfinite(d) & (d > 0)
    p = torch.as_tensor(params, dtype=dt, device=K.device)
    moved = (valid.flatten(1).float().mean(1) >= VIEW_MIN_DEPTH_FRACTION) & (p != 0).any(1)
    median = torch.nanmedian(torch.where(valid, d, torch.nan).flatten(1), 1).values
    p = p * moved[:, None].to(dt)
    N = torch.eye(4, dtype=dt, device=K.device).repeat(B, 1, 1)
    N[:, :3, :3] = roma.rotvec_to_rotmat(p[:, 3:])
    N[:, :3, 3] = p[:, :3] * torch.nan_to_num(median)[:, None]
    R, t = N[:, :3, :3], N[:, :3, 3]
    # Points as (B, 3, N) columns: a 3x3 times 3xN product is one fast bmm, (N, 3) @ (3, 3) is not.
    pix = fr.cell_centres(H, W, 1, device=K.device, dtype=dt).T
    rays = torch.linalg.inv(K) @ torch.cat([pix, torch.ones_like(pix[:1])])  # (B, 3, HW), z = 1

    def project(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, N) camera frame -> pixels (B, 2, N) and depth (B, N)."""
        z = X[:, 2]
        return (K @ X)[:, :2] / z.clamp(min=1e-6)[:, None], z

    # Forward: z-buffer of the old points seen from c'.
    uv, z = project(R @ (rays * torch.nan_to_num(d).view(B, 1, -1)) + t[..., None])
    iu, iv = uv[:, 0].round().long(), uv[:, 1].round().long()
    hit = valid.view(B, -1) & (z > 1e-6) & (iu >= 0) & (iu < W) & (iv >= 0) & (iv < H)
    flat = (torch.arange(B, device=K.device)[:, None] * H * W + iv * W + iu)[hit]
    zbuf = torch.full((B * H * W,), float('inf'), dtype=dt, device=K.device)
    zbuf.scatter_reduce_(0, flat, z[hit], reduce='amin')
    zbuf = zbuf.view(B, 1, H, W)
    nearest = -F.max_pool2d(-torch.where(torch.isinf(zbuf), torch.full_like(zbuf, 1e9), zbuf), 3, 1, 1)
    z_new = torch.where(torch.isinf(zbuf), nearest, zbuf).view(B, -1)
    # Backward: where each new pixel's ray meets the old image.
    uv_old, z_old = project(R.transpose(1, 2) @ (rays * z_new[:, None] - t[..., None]))
    grid = torch.stack([2 * uv_old[:, 0] / (W - 1) - 1, 2 * uv_old[:, 1] / (H - 1) - 1], -1)[:, :, None]
    colour = F.grid_sample(images.to(dt), grid, mode='bilinear', padding_mode='zeros', align_corners=True)[..., 0]
    d_old = F.grid_sample(torch.nan_to_num(d, nan=0.0)[:, None], grid, mode='nearest', padding_mode='zeros',
                          align_corners=True)[:, 0, :, 0]
    seen = (z_new < 1e8) & ((d_old - z_old).abs() <= VISIBLE_DEPTH_RATIO * z_old)
    keep = moved[:, None]
    seen = torch.where(keep, seen, valid.view(B, -1))
    out = dict(batch)
    out['images'] = torch.where(keep[:, :, None, None], (colour * seen[:, None]).view(B, 3, H, W), images.to(dt))
    depth_full = torch.where(keep, torch.where(seen, z_new, torch.nan), d.view(B, -1)).view(B, H, W)
    out['depth_full'] = depth_full
    out['depth'] = torch.where(keep[:, :, None], cells_from_pixels(depth_full, stride), batch['depth'])
    # Labels: project the map points into c' and keep those the new depth map sees.
    T = batch['T'] @ torch.linalg.inv(N)
    lab = batch['labels'].clone()
    uv_l, z_l = project(T[:, :3, :3].transpose(1, 2) @ (lab[..., :3] - T[:, None, :3, 3]).transpose(1, 2))
    uv_l = uv_l.transpose(1, 2)  # (B, M, 2)
    iu, iv = uv_l[..., 0].round().long().clamp(0, W - 1), uv_l[..., 1].round().long().clamp(0, H - 1)
    z_seen = depth_full.view(B, -1).gather(1, iv * W + iu)
    ok = ((z_l > 1e-6) & (uv_l[..., 0] > -0.5) & (uv_l[..., 0] < W - 0.5) & (uv_l[..., 1] > -0.5)
          & (uv_l[..., 1] < H - 0.5) & ((z_seen - z_l).abs() <= VISIBLE_DEPTH_RATIO * z_l))
    lab[..., 3:5] = torch.where(keep[..., None], uv_l, lab[..., 3:5])
    out['labels'] = lab
    out['label_mask'] = batch['label_mask'] & torch.where(keep, ok, torch.ones_like(ok))
    out['T'] = T
    return out, N
