"""A map of the place, and the pose refinements against it. Never imports rclpy.

The one-shot alignment (align.py) gives T_map_cam from the network's scene coordinates, centimetres to decimetres
off on new viewpoints. A map built once from the training bags (`globloc map`) then pins the pose down:
- with a depth camera: point-to-plane ICP of the frame's depth against the map's surfaces (refine_icp);
- with the image alone: ORB features of the frame matched to the map's ORB features near where the one-shot pose
  projects them, then PnP-RANSAC (refine_features).

    place = build_map(views)            # views: View(image, K, T_map_cam, depth or None) of recorded frames
    save_map(place, 'place.map.npz'); place = load_map('place.map.npz')
    r = refine(place, T_map_cam, image, K, depth, prior_covariance)   # r.accepted -> r.T_map_cam

The map is built from the bags' images and poses: (a) surfaces, voxel-averaged points with normals, from recorded
depth, and (b) features, ORB descriptors with their map-frame points, from recorded depth or, for frames without
depth, triangulated between frames that see the same part of the place.
Fail-safe rules: directions the surfaces do not constrain (a single wall leaves three) keep the one-shot pose; a
refinement with too little support on the map, or a correction larger than the one-shot error can be, is refused,
and the caller keeps the one-shot pose.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import cv2
import numpy as np
from scipy.spatial import cKDTree

from globloc_ros.frames import rotation_error_deg, scale_intrinsics
from globloc_ros.atomic import atomic_write

MAP_FORMAT = 'globloc-place-map'
MAP_VERSION = 3  # 2: keyframes and their bag-of-words vectors (global recovery); 3: the features each keyframe saw.
# Maps of versions 1 and 2 still load (1: no recovery; 2: recovery searches the features in a keyframe's view cone)
# Building. Surfaces: voxel (m). Features: ORB features per recorded frame, and one descriptor per point of the place
# (2 cm voxel): 3 were 10 % more accurate and 1.8x slower to match.
VOXEL_M = 0.02
# 1000 a frame, as many as a query detects (QUERY_FEATURES), rather than 500: image-only recovery on the SUN3D time
# splits, both ways (4 x 25 queries), within 10 cm / 10 deg 95 -> 97 % on average, within 5 cm / 5 deg 58 -> 63 %,
# median 4.5 -> 4.2 cm; queries 0.2-0.4 m from a 15-frame map 93 -> 100 % (docs/experiments.md).
MAP_FEATURES = 1000
# Frames without depth keep only the features triangulated with other frames: more per frame (castle place, 9
# queries: 7.8 cm median, 67 % within 10 cm with 2000, against 11.0 cm and 11 % with 500; docs/relocalization.md)
MAP_FEATURES_WITHOUT_DEPTH = 2000
FEATURE_VOXEL_M, FEATURES_PER_VOXEL = 0.02, 1
# Triangulation (frames without depth): each frame with the PAIR_NEIGHBOURS farthest frames whose optical axes are
# within PAIR_MAX_ANGLE_DEG (the nearest frames of a video see the place from almost the same point: what passes the
# parallax test there are mostly wrong matches close to the camera); a point is kept when it reprojects within
# TRIANGULATION_ERROR_PX in both and the rays meet at MIN_PARALLAX_DEG or more (below, its depth is poorly fixed).
PAIR_NEIGHBOURS, PAIR_MAX_ANGLE_DEG, TRIANGULATION_ERROR_PX, MIN_PARALLAX_DEG = 4, 40.0, 2.0, 2.0
CONFIRM_VIEWS = 8  # frames searched for a third view of each triangulated point
# ICP. Correspondence distance per iteration: coarse to fine, then up to 18 more at 5 cm until the update is below
# 1e-6. A tighter last gate (2-3 cm) made real depth (SUN3D) converge less consistently from different starts.
GATES_M = (0.2, 0.1, *[0.05] * 18)
MIN_POINTS = 50
MIN_EIGENVALUE = 1e-3  # of the per-point normal matrix A^T A / N: below it a direction is not constrained
MIN_INLIER_FRACTION = 0.5
ICP_CONVERGED = 1e-3  # an ICP step below this (m, rad; 1 mm, 0.06 deg: a twentieth of the voxel) ends it
MAX_CORRECTION = (0.3, 10.0)  # metres, degrees: an RGB-D one-shot pose this far off would not have passed its gate
MAX_QUERY_POINTS = 1000  # depth points per frame; 600 doubled the worst errors, 1500 cost twice the time on 640x480
# Features. Search radii (pixels at 320x240, scaled with the image width) of the two matching rounds: around where
# the one-shot pose projects the map's features, then around where the first PnP pose does.
QUERY_FEATURES = 1000
# ORB pyramid: 4 levels of 1.2 (scale changes up to 1.7x between a map view and a query) instead of OpenCV's 8. The
# coarse levels' keypoints are placed to a few pixels only; with fewer levels the same number of features sit at the
# fine ones. Image-only recovery, 10 cm / 10 deg recall, 8 -> 4 levels (map version 2): SUN3D frag1 time split
# 28 -> 80 % (72 % at version 3), frag2 96 -> 96 %, castle 67 -> 78 %; synthetic hard pass + map 96.7 -> 98.0 %
# (3 levels: 64, 100, 78, 97.0 %; 1 level: 100, 100, 44 %; docs/experiments.md).
ORB_LEVELS = 4
# Features spread over the image, as ORB-SLAM spreads them, in maps of frames with depth and in the queries against
# them: a frame's strongest corners bunch on a few textured objects, and PnP on points from a small part of the view
# trades a sideways shift for a turn (SUN3D frag1 seen from 3-4 m: LM from the recorded pose on its own inliers ends
# 8.8 cm off with the 1000 strongest, 6.5 cm spread). detect(spread=True) asks ORB for SPREAD_OVERSAMPLE x n corners
# and keeps n: the strongest of each cell of a SPREAD_GRID (columns, rows), then the second strongest of each, and so
# on. Image-only recovery against a map with depth, 10 cm / 10 deg: frag1 time split 72 -> 84 %, frag2 96 -> 100 %;
# synthetic hard pass + map 98.0 -> 97.3 %. Triangulation (frames without depth) keeps the strongest: spread, the
# Strecha stills gave half the points and fewer refinements (docs/experiments.md).
SPREAD_OVERSAMPLE, SPREAD_GRID = 6, (8, 6)
# FAST corner threshold (grey levels), OpenCV's. Lower (8, 7, 5) poses a synthetic stretch facing a dark brick wall
# (72 -> 100 %), but on real images it let refinements through 17-19 cm off (docs/experiments.md): not adopted.
FAST_THRESHOLD = 10
RADII_PX = (20.0, 6.0)
MAX_HAMMING = 50
RATIO = 0.8
PNP_ERROR_PX = 3.0
MIN_PNP_INLIERS = 20
MAX_FEATURE_CORRECTION = (0.5, 15.0)  # monocular one-shot poses are decimetres off
# A PnP pose is taken only when its own covariance pins it: position std <= 1 % of the matched points' median depth
# and rotation std <= 1 deg. In 160x120 views of walls 2-3 m away, PnP poses 6-30 cm off came with position stds of
# 3.4-21 cm, right ones with 3.2 cm and less.
MAX_RELATIVE_STD, MAX_ROTATION_STD_DEG = 0.01, 1.0
# Global recovery, when the refinement near a pose is refused or there is no pose to start from: the map's keyframes
# (a recorded frame kept when KEYFRAME_STEP metres or degrees from the last one) each have a bag-of-words vector over
# a VOCABULARY_WORDS-word ORB vocabulary learnt from the map's own descriptors (tf-idf, L2-normalised). A frame's
# vector retrieves the RECOVERY_CANDIDATES keyframes that see what it sees; its features are matched to the map
# features those keyframes see, PnP-RANSAC gives a pose, and refine_features (then ICP with depth) from that pose
# decides, with the same covariance test as any refinement.
KEYFRAME_STEP = (0.05, 5.0)
VOCABULARY_WORDS, VOCABULARY_SAMPLE = 512, 40_000
RECOVERY_CANDIDATES = 5
RECOVERY_RANSAC_ITERATIONS = 1000
# A place that repeats itself (alike rooms, floors): a recovered pose is not taken when the best keyframes more than
# REPEAT_M from it give a verified pose that far or REPEAT_DEG turned from it.
REPEAT_M, REPEAT_DEG = 1.0, 10.0
# The published covariance adds a floor to what the residuals give: the map's points carry errors that do not average
# out over many matches (a depth camera's scale and registration, the recorded poses, triangulation), a share of the
# depth. Position std: FLOOR_RELATIVE x the median depth of the matched points (features) or depth points (ICP);
# rotation std: FLOOR_ROTATION_DEG. The tests that accept a refinement use the residuals' covariance alone.
FLOOR_RELATIVE = {'features': 0.02, 'icp': 0.01}
FLOOR_ROTATION_DEG = 0.5
# Result covariance order (x, y, z, roll, pitch, yaw) from the refinement parameters (rotation (3), translation (3)).
_TO_ROS = np.array([3, 4, 5, 0, 1, 2])


KEYFRAME_ARRAYS = ('keyframe_poses', 'keyframe_K', 'keyframe_size', 'keyframe_bow', 'vocabulary', 'idf')
VISIBILITY_ARRAYS = ('keyframe_features', 'keyframe_features_start')
MAX_MATCHER_ROWS = 1 << 18  # OpenCV's brute-force matcher refuses more map descriptors than this in one call


class MapError(RuntimeError):
    """A map file that cannot be used; the message names the file and the problem."""


class View(NamedTuple):
    """One recorded frame for build_map: image (H, W, 3) uint8 RGB, K (3, 3), T_map_cam (4, 4), depth (H, W)
    metres (NaN: not measured) registered to the image, or None."""
    image: np.ndarray
    K: np.ndarray
    T_map_cam: np.ndarray
    depth: np.ndarray | None


@dataclass
class PlaceMap:
    """Surfaces: points, normals (N, 3) float32, voxel centroids in the map frame (metres) and unit normals.
    voxel: their averaging voxel (m).
    Features: feature_points (M, 3) float32 map frame (metres) and descriptors (M, 32) uint8 (ORB).
    Keyframes (global recovery; empty in maps from before version 2): keyframe_poses (F, 4, 4) float32 T_map_cam,
    keyframe_K (F, 3, 3) float32, keyframe_size (F, 2) int32 (W, H) pixels, keyframe_bow (F, V) float16 unit
    tf-idf vectors over vocabulary (V, 32) uint8 ORB word centres with idf (V,) float32.
    Visibility (empty in maps from before version 3): keyframe_features (S,) int32, the indices of the features
    keyframe f saw at keyframe_features[keyframe_features_start[f]:keyframe_features_start[f + 1]] ((F + 1,) int64):
    what recovery matches against, however large the place.
    spread_features: whether the features of frames with depth were detected spread over the image (detect); queries
    detect theirs alike. False in maps from before.
    meta: where it came from (bags, frames)."""
    points: np.ndarray
    normals: np.ndarray
    voxel: float
    feature_points: np.ndarray
    descriptors: np.ndarray
    meta: dict = field(default_factory=dict)
    keyframe_poses: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4), np.float32))
    keyframe_K: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 3), np.float32))
    keyframe_size: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    keyframe_bow: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))
    vocabulary: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), np.uint8))
    idf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    keyframe_features: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    keyframe_features_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    spread_features: bool = False

    @cached_property
    def feature_tree(self) -> cKDTree:
        return cKDTree(self.feature_points)

    @cached_property
    def feature_range_m(self) -> float:
        """How far from a camera the map's features were seen: 1.25 x the farthest a keyframe saw one (inf in maps
        from before version 3, or where that reaches across the whole map: nothing to leave out)."""
        start = self.keyframe_features_start
        if not len(self.keyframe_features):
            return float('inf')
        owner = np.repeat(np.arange(len(start) - 1), np.diff(start))
        far = np.linalg.norm(self.feature_points[self.keyframe_features] - self.keyframe_poses[owner, :3, 3], axis=1)
        reach = 1.25 * float(far.max())
        return reach if 2 * reach < np.ptp(self.feature_points, 0).max() else float('inf')

    def features_near(self, centre: np.ndarray) -> np.ndarray | None:
        """Indices of the features within feature_range_m of a camera centre (3,) metres; None where that is inf
        (every feature: no index to build on the matching path)."""
        if not np.isfinite(self.feature_range_m):
            return None
        return np.sort(np.asarray(self.feature_tree.query_ball_point(centre, self.feature_range_m), int))

    def build_search_trees(self) -> PlaceMap:
        """Build the search trees refinement uses now (cached), not at the first frame that needs them."""
        if len(self.points):
            self.tree
        if np.isfinite(self.feature_range_m):
            self.feature_tree
        return self

    def seen_by(self, keyframes: np.ndarray) -> np.ndarray:
        """Indices (k,) of the features any of these keyframes (indices (n,)) saw, sorted."""
        start = self.keyframe_features_start
        return np.unique(np.concatenate([self.keyframe_features[start[f]:start[f + 1]] for f in keyframes]))

    @cached_property
    def tree(self) -> cKDTree:
        """ICP's nearest-neighbour index of the surface points. Unbalanced with 32 points a leaf: the same answers as
        scipy's default, 10-15 % faster to query and twice as fast to build (docs/experiments.md)."""
        return cKDTree(self.points, leafsize=32, balanced_tree=False)


@dataclass
class Refinement:
    """A refinement's answer. method: 'icp' or 'features'. T_map_cam (4, 4): refined when accepted, else the pose
    given. covariance (6, 6): x, y, z, roll, pitch, yaw (fixed map axes, about the camera centre), as in
    PoseWithCovariance. constrained: how many of the 6 pose directions the data pinned (the others kept the pose
    given). points: depth points or feature matches tried; inlier_fraction: the share that agreed with the result;
    rms: their residual (ICP: m, point to plane; features: px). reason: '' when accepted, else why not."""
    method: str
    T_map_cam: np.ndarray
    accepted: bool
    reason: str
    covariance: np.ndarray
    inlier_fraction: float = 0.0
    rms: float = float('nan')
    constrained: int = 0
    points: int = 0


# ------------------------------------------------------------------------------------------------ building
def _backproject(u: np.ndarray, v: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels (u, v) at depth z (any equal shapes S) with K (3, 3) -> camera-frame points (*S, 3)."""
    return np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)


def depth_points(depth: np.ndarray, K: np.ndarray, stride: int) -> np.ndarray:
    """depth (H, W) metres along the optical axis (NaN / <= 0: not measured), K (3, 3) of that image ->
    camera-frame points (h, w, 3) of every stride-th pixel (NaN where not measured)."""
    d = np.asarray(depth, np.float64)[::stride, ::stride]
    d = np.where(np.isfinite(d) & (d > 0), d, np.nan)
    v, u = np.mgrid[0:depth.shape[0]:stride, 0:depth.shape[1]:stride].astype(np.float64)
    return _backproject(u, v, d, K)


def surface_normals(X: np.ndarray, max_step: float = 0.1) -> np.ndarray:
    """X (h, w, 3) camera-frame points on a pixel grid -> unit normals (h, w, 3) facing the camera, NaN at the
    border, at depth edges and on grazing surfaces (a neighbour farther than max_step x depth)."""
    dx = np.full_like(X, np.nan)
    dy = np.full_like(X, np.nan)
    dx[:, 1:-1] = X[:, 2:] - X[:, :-2]
    dy[1:-1] = X[2:] - X[:-2]
    n = np.cross(dx, dy)
    with np.errstate(invalid='ignore', divide='ignore'):
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n[np.sum(n * X, -1) > 0] *= -1
        step = np.maximum(np.linalg.norm(dx, axis=-1), np.linalg.norm(dy, axis=-1))
        edge = step > max_step * X[..., 2]
    n[edge] = np.nan
    return n


def orb(n_features: int) -> cv2.ORB:
    return cv2.ORB_create(nfeatures=n_features, fastThreshold=FAST_THRESHOLD, nlevels=ORB_LEVELS)


def detect(image: np.ndarray, n_features: int, spread: bool) -> tuple[np.ndarray, np.ndarray]:
    """Up to n_features ORB features of an (H, W, 3) uint8 RGB image, strongest first: (uv (n, 2) pixels,
    descriptors (n, 32) uint8). spread: over the image (SPREAD_GRID), else the strongest."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    kps, des = orb((SPREAD_OVERSAMPLE if spread else 1) * n_features).detectAndCompute(gray, None)
    if des is None:
        return np.zeros((0, 2)), np.zeros((0, 32), np.uint8)
    uv = np.array([k.pt for k in kps]).reshape(-1, 2)
    response = np.array([k.response for k in kps])
    if not spread:
        strong = np.argsort(-response, kind='stable')
        return uv[strong], des[strong]
    cols, rows = SPREAD_GRID
    H, W = gray.shape
    cell = np.minimum(uv[:, 0] * cols // W, cols - 1) * rows + np.minimum(uv[:, 1] * rows // H, rows - 1)
    by_cell = np.lexsort((-response, cell))
    start = np.flatnonzero(np.r_[True, np.diff(cell[by_cell]) != 0])
    rank = np.empty(len(kps), int)  # 0: the strongest of its cell, 1: the second, ...
    rank[by_cell] = np.arange(len(kps)) - np.repeat(start, np.diff(np.r_[start, len(kps)]))
    keep = np.lexsort((-response, rank))[:n_features]
    keep = keep[np.argsort(-response[keep], kind='stable')]
    return uv[keep], des[keep]


def query_features(place: PlaceMap, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A frame's QUERY_FEATURES ORB features to match against place, detected as its features were (detect)."""
    return detect(image, QUERY_FEATURES, place.spread_features)


def frame_features(view: View, n_features: int,
                   features: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ORB features of one recorded frame with recorded depth, as (map-frame points (m, 3), descriptors (m, 32)):
    those whose depth is measured and smooth around them (not on a depth edge). features: detect()'s output for
    view.image where already computed."""
    uv, des = detect(view.image, n_features, spread=True) if features is None else features
    if not len(des):
        return np.zeros((0, 3)), np.zeros((0, 32), np.uint8)
    u, v = np.round(uv).astype(int).T
    d = np.asarray(view.depth, np.float64)
    patch = np.stack([d[np.clip(v + dv, 0, d.shape[0] - 1), np.clip(u + du, 0, d.shape[1] - 1)]
                      for dv in (-1, 0, 1) for du in (-1, 0, 1)])
    z = patch[4]
    with np.errstate(invalid='ignore'):
        ok = np.isfinite(patch).all(0) & (z > 0) & (patch.max(0) - patch.min(0) < 0.05 * z)
    X = _backproject(uv[:, 0], uv[:, 1], z, view.K)[ok]
    return X @ view.T_map_cam[:3, :3].T + view.T_map_cam[:3, 3], des[ok]


def triangulate_features(views: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                         with_sources: bool = False) -> tuple[np.ndarray, ...]:
    """Features of frames without depth, with the poses known: views [(uv (n, 2), descriptors (n, 32), K (3, 3),
    T_map_cam (4, 4))] -> (map-frame points (m, 3), descriptors (m, 32)), each point once per frame it was matched in.
    with_sources: a third array (m, 2) int64, the (view, feature) index of each row, i.e. which pixel sees the point
    (training labels need it).
    Pairs: each frame with the PAIR_NEIGHBOURS farthest (camera centres) whose optical axes differ by at most
    PAIR_MAX_ANGLE_DEG; matches: Hamming nearest neighbour with the ratio test; a point is kept when a third frame
    confirms it (_confirmed): two views alone cannot tell a right match from a wrong one along the epipolar line,
    which repeated structure (windows, tiles) gives in numbers."""
    points, descriptors, sources = [np.zeros((0, 3))], [np.zeros((0, 32), np.uint8)], [np.zeros((0, 2), np.int64)]
    if len(views) < 2:
        return (points[0], descriptors[0], sources[0])[:3 if with_sources else 2]
    centres = np.array([T[:3, 3] for *_, T in views])
    axes = np.array([T[:3, 2] for *_, T in views])
    baseline = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    similar = axes @ axes.T >= np.cos(np.radians(PAIR_MAX_ANGLE_DEG))
    np.fill_diagonal(similar, False)
    pairs = set()
    for i in range(len(views)):  # the widest baselines among frames looking the same way: the best-fixed depths
        js = np.flatnonzero(similar[i])
        for j in js[np.argsort(-baseline[i, js])][:PAIR_NEIGHBOURS]:
            pairs.add((min(i, j), max(i, j)))
    trees = [cKDTree(uv) if len(uv) else None for uv, *_ in views]

    def third_views(i: int, j: int) -> np.ndarray:  # the nearest frames looking the same way as i or j
        ks = np.flatnonzero((similar[i] | similar[j]) & (np.arange(len(views)) != i) & (np.arange(len(views)) != j))
        return ks[np.argsort(baseline[i, ks] + baseline[j, ks])][:CONFIRM_VIEWS]

    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    for i, j in sorted(pairs):
        (uv_i, des_i, K_i, T_i), (uv_j, des_j, K_j, T_j) = views[i], views[j]
        if len(des_i) < 2 or len(des_j) < 2:
            continue
        a, b = ratio_matches(matcher, des_i, des_j)
        if not len(a):
            continue
        X, ok = triangulate_pair(uv_i[a], uv_j[b], K_i, T_i, K_j, T_j, TRIANGULATION_ERROR_PX)
        ok[ok] = _confirmed(X[ok], des_i[a[ok]], des_j[b[ok]], views, trees, third_views(i, j))
        points += [X[ok], X[ok]]
        descriptors += [des_i[a[ok]], des_j[b[ok]]]
        sources += [np.column_stack([np.full(ok.sum(), i), a[ok]]), np.column_stack([np.full(ok.sum(), j), b[ok]])]
    out = np.concatenate(points), np.concatenate(descriptors), np.concatenate(sources).astype(np.int64)
    return out if with_sources else out[:2]


def hamming(des_a: np.ndarray, i: np.ndarray, des_b: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distances between ORB descriptors des_a[i] and des_b[j]: des (N, 32) uint8, i, j (k,) -> (k,) int32.
    One 64-bit column at a time: numpy gathers rows of 4 uint64 several times slower than 1-D strided ones."""
    a, b = des_a.view(np.uint64), des_b.view(np.uint64)
    d = np.zeros(len(i), np.int32)
    for k in range(a.shape[1]):
        d += np.bitwise_count(a[:, k][i] ^ b[:, k][j])
    return d


def ratio_matches(matcher: cv2.DescriptorMatcher, des_i: np.ndarray, des_j: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour matches of descriptors des_i (n, D) in des_j (m, D) that pass the RATIO test ->
    (index into des_i (k,), index into des_j (k,))."""
    m = [a for a, b in matcher.knnMatch(des_i, des_j, k=2) if a.distance < RATIO * b.distance]
    return np.array([x.queryIdx for x in m], int), np.array([x.trainIdx for x in m], int)


def triangulate_pair(uv_i: np.ndarray, uv_j: np.ndarray, K_i: np.ndarray, T_i: np.ndarray, K_j: np.ndarray,
                     T_j: np.ndarray, max_error_px: float, min_parallax_deg: float = MIN_PARALLAX_DEG
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Matched pixels uv_i, uv_j (n, 2) of two frames with K (3, 3) and T_map_cam (4, 4) -> (map-frame points
    (n, 3), ok (n,)): ok where the point lies in front of both cameras, reprojects within max_error_px in both and
    the rays meet at min_parallax_deg or more (below, its depth is poorly fixed)."""
    P_i, P_j = K_i @ np.linalg.inv(T_i)[:3], K_j @ np.linalg.inv(T_j)[:3]
    X = cv2.triangulatePoints(P_i, P_j, uv_i.T.astype(np.float64), uv_j.T.astype(np.float64))
    with np.errstate(divide='ignore', invalid='ignore'):
        X = (X[:3] / X[3]).T
        ok = np.isfinite(X).all(1)
        for P, uv in ((P_i, uv_i), (P_j, uv_j)):
            x = X @ P[:, :3].T + P[:, 3]
            ok &= (x[:, 2] > 0) & (np.linalg.norm(x[:, :2] / x[:, 2:] - uv, axis=1) < max_error_px)
        r_i, r_j = X - T_i[:3, 3], X - T_j[:3, 3]
        cos = np.sum(r_i * r_j, 1) / (np.linalg.norm(r_i, axis=1) * np.linalg.norm(r_j, axis=1))
        ok &= cos <= np.cos(np.radians(min_parallax_deg))
    return X, ok


def _confirmed(X: np.ndarray, des_a: np.ndarray, des_b: np.ndarray, views: list, trees: list,
               others: np.ndarray) -> np.ndarray:
    """(n,) bool: whether a frame in `others` (indices into views [(uv, descriptors, K, T_map_cam)], trees: cKDTree
    of each uv) has a feature within TRIANGULATION_ERROR_PX of where the point X (n, 3) projects whose descriptor
    is within MAX_HAMMING of the point's (des_a or des_b, (n, 32))."""
    ok = np.zeros(len(X), bool)
    for k in others:
        uv_k, des_k, K_k, T_k = views[k]
        if trees[k] is None or ok.all():
            continue
        uv, z = _project(X, T_k[:3, :3], T_k[:3, 3], K_k)
        todo = np.flatnonzero(~ok & (z > 0) & np.isfinite(uv).all(1))
        _, nn = trees[k].query(uv[todo], k=3, distance_upper_bound=TRIANGULATION_ERROR_PX)
        for c in range(nn.shape[1]):
            hit = nn[:, c] < len(uv_k)
            rows, f = todo[hit], nn[hit, c]
            d = np.minimum(hamming(des_a, rows, des_k, f), hamming(des_b, rows, des_k, f))
            ok[rows[d <= MAX_HAMMING]] = True
    return ok


def build_map(views: Iterable[View], voxel: float = VOXEL_M, stride: int = 2, n_features: int | None = None,
              meta: dict | None = None) -> PlaceMap:
    """Recorded frames -> PlaceMap. Surfaces (frames with depth): every stride-th depth pixel's point and normal
    in the map frame, averaged per voxel (m), accumulated as it goes so memory follows the map's size, not the
    number of frames. Features: up to n_features ORB features per frame (None: MAP_FEATURES for a frame with depth,
    MAP_FEATURES_WITHOUT_DEPTH without), with depth (frame_features) or triangulated between frames without
    (triangulate_features); at most FEATURES_PER_VOXEL per FEATURE_VOXEL_M voxel.
    Raises ValueError when neither comes out."""
    if not voxel > 0:
        raise ValueError(f'voxel must be > 0 m, got {voxel}')
    keys = np.zeros(0, np.int64)
    sums = np.zeros((0, 7))  # point xyz, normal xyz, count
    pending: list[np.ndarray] = []
    feature_points, descriptors = [], []
    counts = {True: MAP_FEATURES if n_features is None else n_features,  # keyed by: the frame has depth
              False: MAP_FEATURES_WITHOUT_DEPTH if n_features is None else n_features}

    def reduce(keys, sums, chunk):
        P = np.concatenate(chunk)
        k = np.concatenate([keys, _voxel_keys(P[:, :3], voxel)])
        s = np.concatenate([sums, np.concatenate([P, np.ones((len(P), 1))], 1)])
        k, inv = np.unique(k, return_inverse=True)
        out = np.zeros((len(k), 7))
        np.add.at(out, inv, s)
        return k, out

    without_depth = []  # (uv, descriptors, K, T_map_cam) to triangulate
    keyframes = []  # (T_map_cam, K, (W, H), descriptors)
    keyframe_of, seen_keys = [], []  # per view without depth: its keyframe or -1; per keyframe: feature voxel keys
    thinned = 0  # features already thinned to one per voxel (_thin_features)
    spread = False  # features of frames with depth, spread over the image (detect)
    for view in views:
        count = counts[view.depth is not None]
        spread |= view.depth is not None and count > 0
        uv, des = detect(view.image, count, spread=view.depth is not None) if count else \
            (np.zeros((0, 2)), np.zeros((0, 32), np.uint8))
        key = len(des) > 0 and (not keyframes or _moved(keyframes[-1][0], view.T_map_cam, KEYFRAME_STEP))
        if key:
            keyframes.append((view.T_map_cam, view.K, view.image.shape[1::-1], des))
            seen_keys.append(np.zeros(0, np.int64))
        if view.depth is None:
            if len(des):
                without_depth.append((uv, des, view.K, view.T_map_cam))
                keyframe_of.append(len(keyframes) - 1 if key else -1)
            continue
        if n_features != 0:
            X, des = frame_features(view, count, (uv, des))
            feature_points.append(X)
            descriptors.append(des)
            if key:
                seen_keys[-1] = _voxel_keys(X, FEATURE_VOXEL_M)
            if sum(len(x) for x in feature_points) > thinned + 500_000:  # memory follows the place, not the frames
                P, D, _ = _thin_features(np.concatenate(feature_points), np.concatenate(descriptors))
                feature_points, descriptors, thinned = [P], [D], len(P)
        X = depth_points(view.depth, view.K, stride)
        n = surface_normals(X)
        ok = np.isfinite(X).all(-1) & np.isfinite(n).all(-1)
        R, t = view.T_map_cam[:3, :3], view.T_map_cam[:3, 3]
        pending.append(np.concatenate([X[ok] @ R.T + t, n[ok] @ R.T], 1))
        if sum(len(p) for p in pending) > 2_000_000:
            keys, sums = reduce(keys, sums, pending)
            pending = []
    if pending:
        keys, sums = reduce(keys, sums, pending)
    X, des, sources = triangulate_features(without_depth, with_sources=True)
    owner = np.array(keyframe_of, np.int64)[sources[:, 0]] if len(X) else np.zeros(0, np.int64)
    triangulated_keys = _voxel_keys(X, FEATURE_VOXEL_M)
    for f in np.unique(owner[owner >= 0]):  # the triangulated points each keyframe without depth saw
        seen_keys[f] = np.concatenate([seen_keys[f], triangulated_keys[owner == f]])
    feature_points = np.concatenate([*feature_points, X])
    descriptors = np.concatenate([*descriptors, des])
    if not len(sums) and not len(feature_points):
        raise ValueError('no recorded depth and no features triangulated between the frames: nothing to map')
    if len(feature_points):
        feature_points, descriptors, fkeys = _thin_features(feature_points, descriptors)
        order = np.argsort(fkeys, kind='stable')
        keyframe_seen = [_with_keys(fkeys[order], order, k) for k in seen_keys]
    else:
        keyframe_seen = [np.zeros(0, np.int32) for _ in keyframes]
    normals = sums[:, 3:6]
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    consistent = norm[:, 0] > 0.5 * sums[:, 6]  # views of the voxel agree on which way the surface faces
    points = (sums[:, :3] / sums[:, 6:])[consistent]
    normals = (normals / np.maximum(norm, 1e-12))[consistent]
    return PlaceMap(points.astype(np.float32), normals.astype(np.float32), float(voxel),
                    feature_points.astype(np.float32), descriptors.astype(np.uint8),
                    dict(meta or {}, voxels=int(consistent.sum()), observations=int(sums[:, 6].sum()),
                         features=len(feature_points), keyframes=len(keyframes)),
                    spread_features=spread, **_keyframe_arrays(keyframes, keyframe_seen))


def _keyframe_arrays(keyframes: list[tuple], seen: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The PlaceMap's keyframe and visibility arrays (KEYFRAME_ARRAYS, VISIBILITY_ARRAYS) of keyframes
    [(T_map_cam (4, 4), K (3, 3), (W, H), descriptors (n, 32))] and the features each saw (seen: sorted indices);
    a vocabulary learnt from their descriptors, idf weights and each one's bag-of-words vector. {} when no
    vocabulary comes out."""
    vocabulary = learn_vocabulary([d for *_, d in keyframes])
    if not len(vocabulary):
        return {}
    counts = np.zeros(len(vocabulary))
    for *_, d in keyframes:
        counts[np.unique(assign_words(d, vocabulary))] += 1
    idf = np.log(len(keyframes) / (1.0 + counts)).clip(0).astype(np.float32)
    return dict(keyframe_poses=np.stack([T for T, *_ in keyframes]).astype(np.float32),
                keyframe_K=np.stack([K for _, K, *_ in keyframes]).astype(np.float32),
                keyframe_size=np.array([wh for *_, wh, _ in keyframes], np.int32),
                keyframe_bow=np.stack([bow_vector(d, vocabulary, idf) for *_, d in keyframes]).astype(np.float16),
                vocabulary=vocabulary, idf=idf, keyframe_features=np.concatenate(seen),
                keyframe_features_start=np.r_[0, np.cumsum([len(k) for k in seen])].astype(np.int64))


def _thin_features(points: np.ndarray, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same point seen from many frames: the first FEATURES_PER_VOXEL of each FEATURE_VOXEL_M voxel, in order.
    points (n, 3), descriptors (n, 32) -> (points (m, 3), descriptors (m, 32), voxel keys (m,))."""
    keys = _voxel_keys(points, FEATURE_VOXEL_M)
    order = np.argsort(keys, kind='stable')
    first = np.r_[0, np.flatnonzero(np.diff(keys[order])) + 1]
    rank = np.arange(len(keys)) - np.repeat(first, np.diff(np.r_[first, len(keys)]))
    keep = np.sort(order[rank < FEATURES_PER_VOXEL])
    return points[keep], descriptors[keep], keys[keep]


def _with_keys(sorted_keys: np.ndarray, order: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices (sorted, int32) of the features whose voxel key is one of keys (k,); sorted_keys (m,) = all features'
    keys in the order `order` (m,) sorts them."""
    keys = np.unique(keys)
    lo, hi = np.searchsorted(sorted_keys, keys, 'left'), np.searchsorted(sorted_keys, keys, 'right')
    n = hi - lo
    at = np.repeat(lo - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(n.sum())
    return np.sort(order[at]).astype(np.int32)


def _moved(T0: np.ndarray, T1: np.ndarray, step: tuple[float, float]) -> bool:
    """Whether camera poses T0, T1 (4, 4) are at least step = (metres, degrees) apart in position or rotation."""
    return bool(np.linalg.norm(T1[:3, 3] - T0[:3, 3]) >= step[0] or rotation_error_deg(T1[:3, :3], T0[:3, :3]) >= step[1])


def learn_vocabulary(descriptors: list[np.ndarray], words: int = VOCABULARY_WORDS,
                     sample: int = VOCABULARY_SAMPLE) -> np.ndarray:
    """A flat ORB vocabulary: k-means (Euclidean on the 256 bits, i.e. Hamming) of at most `sample` of the
    descriptors [(n_i, 32) uint8], centres rounded to bits -> (V, 32) uint8, V <= words; (0, 32) when there are
    fewer descriptors than 2 words' worth. Seeded: the same descriptors give the same vocabulary."""
    d = np.concatenate([np.zeros((0, 32), np.uint8), *descriptors])
    words = min(words, len(d) // 4)
    if words < 2:
        return np.zeros((0, 32), np.uint8)
    rng = np.random.default_rng(0)
    if len(d) > sample:
        d = d[rng.choice(len(d), sample, replace=False)]
    bits = np.unpackbits(d, axis=1).astype(np.float32)
    cv2.setRNGSeed(0)
    _, _, centres = cv2.kmeans(bits, words, None, (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 8, 0.5),
                               1, cv2.KMEANS_PP_CENTERS)
    return np.unique(np.packbits(centres > 0.5, axis=1), axis=0)


def assign_words(descriptors: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 descriptors -> (n,) index of the nearest word (Hamming)."""
    if not len(descriptors) or not len(vocabulary):
        return np.zeros(len(descriptors), int)
    return np.array([m.trainIdx for m in cv2.BFMatcher(cv2.NORM_HAMMING).match(descriptors, vocabulary)])


def bow_vector(descriptors: np.ndarray, vocabulary: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """An image's (n, 32) descriptors -> (V,) float32 tf-idf bag-of-words vector of unit length (zeros if empty)."""
    v = np.bincount(assign_words(descriptors, vocabulary), minlength=len(vocabulary)).astype(np.float32) * idf
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _voxel_keys(P: np.ndarray, voxel: float) -> np.ndarray:
    """(N, 3) metres -> (N,) int64 voxel ids; 2^21 voxels per axis around the origin (42 km at 2 cm)."""
    q = np.floor(P / voxel).astype(np.int64) + (1 << 20)
    if q.min(initial=0) < 0 or q.max(initial=0) >= (1 << 21):
        raise ValueError(f'map extends beyond +-{voxel * (1 << 20):.0f} m of the origin at voxel {voxel} m')
    return (q[:, 0] << 42) | (q[:, 1] << 21) | q[:, 2]


def save_map(place: PlaceMap, path: str | os.PathLike) -> None:
    """Write an .npz atomically (atomic.atomic_write); a map without keyframe visibility (read from a version 2
    file) as version 2."""
    visible = len(place.keyframe_features_start) == len(place.keyframe_poses) + 1
    header = json.dumps({'format': MAP_FORMAT, 'version': MAP_VERSION if visible else 2, 'voxel': place.voxel,
                         'spread_features': place.spread_features, 'meta': place.meta})
    atomic_write(path, lambda f: np.savez_compressed(
        f, points=place.points, normals=place.normals.astype(np.float16), feature_points=place.feature_points,
        descriptors=place.descriptors, header=header,
        **{k: getattr(place, k) for k in KEYFRAME_ARRAYS + (VISIBILITY_ARRAYS if visible else ())}))


def load_map(path: str | os.PathLike) -> PlaceMap:
    """Read and check a map written by save_map. Raises MapError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise MapError(f'map file not found: {path} (build one with `globloc map`)')
    with open(path, 'rb') as f:
        zip_magic = f.read(4) == b'PK\x03\x04'
    if not zip_magic:  # np.load would take any other file for a pickle
        raise MapError(f'{path}: not a globloc map file (not an .npz archive; build one with `globloc map`)')
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z['header']))
            arrays = {k: z[k] for k in ('points', 'normals', 'feature_points', 'descriptors')}
            version = header.get('version')
            keyframes = {k: z[k] for k in KEYFRAME_ARRAYS if version in (2, MAP_VERSION)}
            visibility = {k: z[k] for k in VISIBILITY_ARRAYS if version == MAP_VERSION}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # A truncated or corrupt file: BadZipFile, EOFError or zlib.error from the zip; ValueError from the arrays
        raise MapError(f'{path}: not a readable globloc map file ({type(e).__name__}: {e})') from e
    if header.get('format') != MAP_FORMAT:
        raise MapError(f'{path}: format {header.get("format")!r} is not {MAP_FORMAT!r}')
    if header.get('version') not in (1, 2, MAP_VERSION):
        raise MapError(f'{path}: map version {header.get("version")} is not {MAP_VERSION}; rebuild it with '
                       '`globloc map`')
    P, N, F, D = (arrays[k] for k in ('points', 'normals', 'feature_points', 'descriptors'))
    if P.ndim != 2 or P.shape[1] != 3 or N.shape != P.shape or F.ndim != 2 or F.shape[1] != 3 \
            or D.shape != (len(F), 32) or D.dtype != np.uint8:
        raise MapError(f'{path}: points {P.shape}, normals {N.shape}, feature_points {F.shape}, descriptors '
                       f'{D.shape} {D.dtype}: expected (N, 3), (N, 3), (M, 3), (M, 32) uint8')
    if not (np.isfinite(P).all() and np.isfinite(N).all() and np.isfinite(F).all()):
        raise MapError(f'{path}: points, normals or feature points are not finite')
    if keyframes:
        n, v = len(keyframes['keyframe_poses']), len(keyframes['vocabulary'])
        want = dict(keyframe_poses=(n, 4, 4), keyframe_K=(n, 3, 3), keyframe_size=(n, 2), keyframe_bow=(n, v),
                    vocabulary=(v, 32), idf=(v,))
        got = {k: a.shape for k, a in keyframes.items()}
        if got != want or not all(np.isfinite(a).all() for a in keyframes.values()):
            raise MapError(f'{path}: keyframe arrays {got} are not consistent and finite (expected {want})')
    if visibility:
        seen, start = visibility['keyframe_features'], visibility['keyframe_features_start']
        if start.shape != (len(keyframes.get('keyframe_poses', ())) + 1,) or start[0] != 0 \
                or np.any(np.diff(start) < 0) or start[-1] != len(seen) or np.any((seen < 0) | (seen >= len(F))):
            raise MapError(f'{path}: keyframe_features ({len(seen)}) and keyframe_features_start {start.shape} do not '
                           f'index the {len(F)} features of its keyframes')
    return PlaceMap(P.astype(np.float32), N.astype(np.float32), float(header['voxel']), F.astype(np.float32), D,
                    header.get('meta', {}), **keyframes, **visibility,
                    spread_features=bool(header.get('spread_features', False)))


# ------------------------------------------------------------------------------------------------ refinement
def refine(place: PlaceMap, T_map_cam: np.ndarray, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None,
           prior_covariance: np.ndarray, features: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
           ) -> Refinement | None:
    """The refinement this map and frame allow: ICP with a depth image (depth (H', W') metres registered to the
    image) when the map has surfaces, else features when it has them; None when neither applies.
    features: gives the image's query_features, called only when features are matched (a caller that refines one
    frame more than once detects them once)."""
    if depth is not None and len(place.points) >= MIN_POINTS:
        Kd = scale_intrinsics(K, depth.shape[1] / image.shape[1], depth.shape[0] / image.shape[0])
        return refine_icp(place, T_map_cam, depth, Kd, prior_covariance)
    if len(place.feature_points) >= MIN_PNP_INLIERS:
        return refine_features(place, T_map_cam, image, K, prior_covariance,
                               features=None if features is None else features())
    return None


def _correction(T0: np.ndarray, R: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """(metres, degrees) between T0 and the pose (R, c)."""
    return float(np.linalg.norm(c - T0[:3, 3])), float(rotation_error_deg(R, T0[:3, :3]))


def _with_floor(cov: np.ndarray, method: str, depth_m: float) -> np.ndarray:
    """cov (6, 6) in the refinement parameters (rotation, translation) + the FLOOR_* variances at depth_m."""
    floor = [np.radians(FLOOR_ROTATION_DEG) ** 2] * 3 + [(FLOOR_RELATIVE[method] * depth_m) ** 2] * 3
    return cov + np.diag(floor)


def _to_ros(cov: np.ndarray) -> np.ndarray:
    return cov[np.ix_(_TO_ROS, _TO_ROS)]


def _from_ros(cov: np.ndarray) -> np.ndarray:
    order = np.argsort(_TO_ROS)
    return np.asarray(cov, np.float64)[np.ix_(order, order)]


def refine_icp(place: PlaceMap, T_map_cam: np.ndarray, depth: np.ndarray, K: np.ndarray,
               prior_covariance: np.ndarray, gates_m: tuple[float, ...] = GATES_M,
               max_points: int = MAX_QUERY_POINTS, min_inlier_fraction: float = MIN_INLIER_FRACTION,
               max_correction: tuple[float, float] = MAX_CORRECTION) -> Refinement:
    """Point-to-plane ICP of a measured depth image against the map's surfaces, from T_map_cam (4, 4).

    depth (H, W) metres (NaN / <= 0: not measured) with K (3, 3) of that depth image; prior_covariance (6, 6) of
    T_map_cam (x, y, z, roll, pitch, yaw), kept in the directions the surfaces do not constrain.
    Each iteration pairs each depth point (at most max_points, on a grid) with its nearest map point within the
    gate and solves for a rotation about the camera centre and a translation, in the eigenbasis of A^T A keeping
    only directions with mean sensitivity >= MIN_EIGENVALUE (m^2 per m^2 or per rad^2).
    Covariance of the refined directions: sigma^2 (A^T A)^-1 with sigma^2 = mean squared residual + voxel^2 / 12
    (the map's own quantisation), residuals taken as independent.
    """
    T0 = np.asarray(T_map_cam, np.float64)
    keep_pose = lambda reason, **kw: Refinement('icp', T0, False, reason, prior_covariance, **kw)  # noqa: E731
    stride = max(1, int(np.ceil(np.sqrt(depth.size / max_points))))
    X = depth_points(depth, K, stride).reshape(-1, 3)
    X = X[np.isfinite(X).all(1)]
    if len(X) < MIN_POINTS:
        return keep_pose(f'{len(X)} depth points < {MIN_POINTS}', points=len(X))
    R, c = T0[:3, :3].copy(), T0[:3, 3].copy()
    for gate in gates_m:
        P = X @ R.T + c
        dist, j = place.tree.query(P, distance_upper_bound=gate)
        hit = np.isfinite(dist)
        if hit.sum() < MIN_POINTS:
            return keep_pose(f'{hit.sum()} of {len(X)} depth points within {gate:g} m of the map', points=len(X),
                             inlier_fraction=float(hit.mean()))
        p, n = P[hit], place.normals[j[hit]].astype(np.float64)
        r = np.sum((p - place.points[j[hit]]) * n, 1)
        A = np.concatenate([np.cross(p - c, n), n], 1)
        lam, V = np.linalg.eigh(A.T @ A / len(r))
        pinned = lam >= MIN_EIGENVALUE
        x = -V[:, pinned] @ ((V[:, pinned].T @ (A.T @ r / len(r))) / lam[pinned])
        R, c = cv2.Rodrigues(x[:3])[0] @ R, c + x[3:]
        converged = np.abs(x).max() < ICP_CONVERGED
        if converged:
            break
    # The residuals at the final pose: after a step below ICP_CONVERGED at the last gate, with the pairs found just
    # before it (one nearest-neighbour search less: 10-15 % of the time, the same pose), else with pairs found anew.
    if not (converged and gate == gates_m[-1]):
        dist, j = place.tree.query(X @ R.T + c, distance_upper_bound=gates_m[-1])
        hit = np.isfinite(dist)
    inliers = float(hit.mean())
    res = np.sum((X[hit] @ R.T + c - place.points[j[hit]]) * place.normals[j[hit]], 1)
    rms = float(np.sqrt(np.mean(res ** 2))) if hit.any() else float('nan')
    stats = dict(inlier_fraction=inliers, rms=rms, constrained=int(pinned.sum()), points=len(X))
    if not (np.isfinite(R).all() and np.isfinite(c).all()):
        return keep_pose('refined pose not finite', **stats)
    if inliers < min_inlier_fraction:
        return keep_pose(f'{inliers:.0%} of the depth points on the map < {min_inlier_fraction:.0%}', **stats)
    moved_m, turned_deg = _correction(T0, R, c)
    if moved_m > max_correction[0] or turned_deg > max_correction[1]:
        return keep_pose(f'correction {moved_m:.2f} m / {turned_deg:.1f} deg exceeds {max_correction[0]:g} m / '
                         f'{max_correction[1]:g} deg', **stats)
    sigma2 = rms ** 2 + place.voxel ** 2 / 12
    Vp, Vu = V[:, pinned], V[:, ~pinned]
    cov = _with_floor(Vp @ np.diag(sigma2 / (len(res) * lam[pinned])) @ Vp.T, 'icp', float(np.median(X[:, 2])))
    cov = Vp @ Vp.T @ cov @ Vp @ Vp.T + Vu @ Vu.T @ _from_ros(prior_covariance) @ Vu @ Vu.T
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, c
    return Refinement('icp', T, True, '', _to_ros(cov), **stats)


def _project(X: np.ndarray, R: np.ndarray, c: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map-frame points (N, 3) seen from the camera (R, c) = (R_map_cam, centre) -> (uv (N, 2), depth (N,))."""
    Xc = (X - c) @ R
    with np.errstate(divide='ignore', invalid='ignore'):
        uv = (Xc @ K.T)[:, :2] / Xc[:, 2:]
    return uv, Xc[:, 2]


def _match(place: PlaceMap, R: np.ndarray, c: np.ndarray, K: np.ndarray, size: tuple[int, int],
           uv_query: np.ndarray, des_query: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Guided matching: each query feature against the map features that (R, c) projects within `radius` px of
    it; the best by Hamming distance if <= MAX_HAMMING and < RATIO x the second best. -> (map index (k,),
    query index (k,))."""
    near = place.features_near(c)
    P = place.feature_points if near is None else place.feature_points[near]
    Xc = (P - c) @ R  # camera frame; only the points in front of it are projected (as _project does)
    front = np.flatnonzero(Xc[:, 2] > 0.05)
    uv = (Xc[front] @ K.T)[:, :2] / Xc[front, 2:]
    W, H = size
    inside = (uv[:, 0] > -radius) & (uv[:, 0] < W + radius) & (uv[:, 1] > -radius) & (uv[:, 1] < H + radius)
    seen = front[inside] if near is None else near[front[inside]]
    if not len(seen):
        return np.zeros(0, int), np.zeros(0, int)
    # Unbalanced trees build in half the time and give the same pairs.
    tree = lambda points: cKDTree(points, balanced_tree=False, compact_nodes=False)  # noqa: E731
    pairs = tree(uv[inside]).sparse_distance_matrix(tree(uv_query), radius, output_type='ndarray')
    if not len(pairs):
        return np.zeros(0, int), np.zeros(0, int)
    return _best_matches(place.descriptors, des_query, seen[pairs['i']], pairs['j'].astype(int))


def _best_matches(des_map: np.ndarray, des_query: np.ndarray, m: np.ndarray, q: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (map index m (k,), query index q (k,)) -> each query feature's best map feature by Hamming
    distance, kept if <= MAX_HAMMING and < RATIO x its second best: (map index (j,), query index (j,))."""
    dist = hamming(des_map, m, des_query, q)
    n = len(des_query)
    best = np.full(n, 256, np.int32)
    np.minimum.at(best, q, dist)
    is_best = dist == best[q]
    pick = np.full(n, -1)
    pick[q[is_best]] = m[is_best]  # one map feature at the best distance, per query feature
    second = np.full(n, 256, np.int32)
    np.minimum.at(second, q, np.where(m == pick[q], 256, dist))  # a tie with another map feature is a second best
    good = (pick >= 0) & (best <= MAX_HAMMING) & (best < RATIO * second)
    return pick[good], np.flatnonzero(good)


def refine_features(place: PlaceMap, T_map_cam: np.ndarray, image: np.ndarray, K: np.ndarray,
                    prior_covariance: np.ndarray, radii_px: tuple[float, ...] = RADII_PX,
                    max_correction: tuple[float, float] = MAX_FEATURE_CORRECTION,
                    features: tuple[np.ndarray, np.ndarray] | None = None) -> Refinement:
    """The frame's ORB features matched to the map's near where T_map_cam (4, 4) projects them, then PnP-RANSAC.

    image (H, W, 3) uint8 RGB and K (3, 3) of it. radii_px (at 320 px width, scaled with the image): one matching
    round each, the later ones from the previous round's pose. Accepted with >= MIN_PNP_INLIERS inliers within
    PNP_ERROR_PX (scaled likewise) and a correction within max_correction.
    Covariance: sigma^2 (J^T J)^-1 of the inliers' reprojection, sigma = their RMS error (>= 0.5 px), in the
    parameters of refine_icp (rotation about the camera centre, centre translation).
    features: query_features(place, image) where already computed.
    """
    T0 = np.asarray(T_map_cam, np.float64)
    keep_pose = lambda reason, **kw: Refinement('features', T0, False, reason, prior_covariance, **kw)  # noqa: E731
    H, W = image.shape[:2]
    scale = W / 320.0
    uv_query, des = query_features(place, image) if features is None else features
    if len(des) < MIN_PNP_INLIERS:
        return keep_pose(f'{len(des)} image features < {MIN_PNP_INLIERS}')
    R, c = T0[:3, :3].copy(), T0[:3, 3].copy()
    inliers = np.zeros(0, int)
    for k, radius in enumerate(radii_px):
        n = len(des) // 2 if k == 0 else len(des)  # the widest search with the stronger half only: half the time
        m, q = _match(place, R, c, K, (W, H), uv_query[:n], des[:n], radius * scale)
        if len(m) < MIN_PNP_INLIERS:
            return keep_pose(f'{len(m)} feature matches within {radius * scale:.0f} px < {MIN_PNP_INLIERS}',
                             points=len(m))
        obj = place.feature_points[m].astype(np.float64)
        img = uv_query[q]
        rvec, _ = cv2.Rodrigues(R.T)
        tvec = -R.T @ c
        ok, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, K, None, rvec, tvec.reshape(3, 1), useExtrinsicGuess=True,
                                                 iterationsCount=200, reprojectionError=PNP_ERROR_PX * scale,
                                                 flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok or inl is None or len(inl) < MIN_PNP_INLIERS:
            return keep_pose(f'{0 if inl is None else len(inl)} PnP inliers of {len(m)} matches < {MIN_PNP_INLIERS}',
                             points=len(m))
        inliers = inl.ravel()
        rvec, tvec = cv2.solvePnPRefineLM(obj[inliers], img[inliers], K, None, rvec, tvec)
        Rcw = cv2.Rodrigues(rvec)[0]
        R, c = Rcw.T, (-Rcw.T @ tvec).ravel()
    uv, z = _project(obj[inliers], R, c, K)
    err = np.linalg.norm(uv - img[inliers], axis=1)
    rms = float(np.sqrt(np.mean(err ** 2)))
    stats = dict(inlier_fraction=len(inliers) / len(m), rms=rms, constrained=6, points=len(m))
    if not (np.isfinite(R).all() and np.isfinite(c).all() and np.all(z > 0)):
        return keep_pose('refined pose not finite or behind the points', **stats)
    moved_m, turned_deg = _correction(T0, R, c)
    if moved_m > max_correction[0] or turned_deg > max_correction[1]:
        return keep_pose(f'correction {moved_m:.2f} m / {turned_deg:.1f} deg exceeds {max_correction[0]:g} m / '
                         f'{max_correction[1]:g} deg', **stats)
    # Jacobian of the projections in (rotation about the centre, centre translation), map axes.
    a = obj[inliers] - c
    Xc = a @ R
    x, y, zc = Xc.T
    dpi = np.zeros((len(a), 2, 3))
    dpi[:, 0, 0], dpi[:, 0, 2] = K[0, 0] / zc, -K[0, 0] * x / zc ** 2
    dpi[:, 1, 1], dpi[:, 1, 2] = K[1, 1] / zc, -K[1, 1] * y / zc ** 2
    skew = np.zeros((len(a), 3, 3))
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -a[:, 2], a[:, 1], -a[:, 0]
    skew[:, 1, 0], skew[:, 2, 0], skew[:, 2, 1] = a[:, 2], -a[:, 1], a[:, 0]
    J = np.concatenate([dpi @ R.T @ skew, dpi @ -R.T[None]], 2).reshape(-1, 6)
    cov = max(rms, 0.5) ** 2 * np.linalg.pinv(J.T @ J)
    std_m = float(np.sqrt(np.linalg.eigvalsh(cov[3:, 3:]).max()))
    std_deg = float(np.degrees(np.sqrt(np.linalg.eigvalsh(cov[:3, :3]).max())))
    depth_m = float(np.median(zc))
    if std_m > MAX_RELATIVE_STD * depth_m or std_deg > MAX_ROTATION_STD_DEG:
        return keep_pose(f'PnP pose not pinned: std {std_m * 100:.1f} cm at {depth_m:.1f} m, {std_deg:.2f} deg '
                         f'(limits {MAX_RELATIVE_STD:.0%} of the depth, {MAX_ROTATION_STD_DEG:g} deg)', **stats)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, c
    return Refinement('features', T, True, '', _to_ros(_with_floor(cov, 'features', depth_m)), **stats)


# ------------------------------------------------------------------------------------------------ global recovery
def _pnp_ransac(obj: np.ndarray, img: np.ndarray, K: np.ndarray, error_px: float
                ) -> tuple[np.ndarray | None, np.ndarray]:
    """P3P-RANSAC of map points obj (n, 3) seen at pixels img (n, 2) -> (T_map_cam (4, 4) or None when fewer than
    MIN_PNP_INLIERS agree, inlier indices (k,))."""
    if len(obj) < MIN_PNP_INLIERS:
        return None, np.zeros(0, int)
    ok, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, K, None, iterationsCount=RECOVERY_RANSAC_ITERATIONS,
                                             reprojectionError=error_px, confidence=0.999, flags=cv2.SOLVEPNP_AP3P)
    inl = np.zeros(0, int) if inl is None else inl.ravel()
    if not ok or len(inl) < MIN_PNP_INLIERS:
        return None, inl
    Rcw = cv2.Rodrigues(rvec)[0]
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = Rcw.T, (-Rcw.T @ tvec).ravel()
    return T, inl


def _not_recovered(reason: str, **stats) -> Refinement:
    """recover's answer when it finds no pose: not accepted, the covariance of a pose not known at all."""
    return Refinement('recovery', np.eye(4), False, reason, np.eye(6) * 1e6, **stats)


def _apart(T0: np.ndarray, T1: np.ndarray) -> tuple[float, float] | None:
    """(metres, degrees) between two poses T_map_cam (4, 4) when they lie more than REPEAT_M or REPEAT_DEG apart,
    else None."""
    moved_m, turned_deg = _correction(T0, T1[:3, :3], T1[:3, 3])
    return (moved_m, turned_deg) if moved_m > REPEAT_M or turned_deg > REPEAT_DEG else None


def _recover_from(place: PlaceMap, keyframes: np.ndarray, image: np.ndarray, K: np.ndarray, uv: np.ndarray,
                  des: np.ndarray, found: np.ndarray | None = None) -> Refinement:
    """recover's search among the map features these keyframes (indices (n,)) saw: matching, PnP-RANSAC and
    verification by refine_features. uv (n, 2), des (n, 32): the image's query_features. found: T_map_cam (4, 4)
    already recovered; a PnP pose that agrees with it (_apart) is not verified, and not accepted."""
    if not len(keyframes):
        return _not_recovered('no keyframes to search')
    if len(place.keyframe_features_start):
        cand = place.seen_by(keyframes)
    else:  # a version-2 map: the features in the keyframes' view cones, walls or not
        seen = np.zeros(len(place.feature_points), bool)
        for f in keyframes:
            T, Kf, (w, h) = place.keyframe_poses[f].astype(np.float64), place.keyframe_K[f].astype(np.float64), \
                place.keyframe_size[f]
            p, z = _project(place.feature_points.astype(np.float64), T[:3, :3], T[:3, 3], Kf)
            seen |= (z > 0.05) & (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
        cand = np.flatnonzero(seen)
        if len(cand) >= MAX_MATCHER_ROWS:
            return _not_recovered(f'{len(cand)} map features in the view cones of the retrieved keyframes: too many '
                                  'to match (a map from before version 3: rebuild it with `globloc map`)')
    if len(cand) < MIN_PNP_INLIERS:
        return _not_recovered(f'{len(cand)} map features in the {len(keyframes)} retrieved keyframes '
                              f'< {MIN_PNP_INLIERS}')
    pairs = [p for p in cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(des, place.descriptors[cand], k=2) if len(p) == 2]
    good = [a for a, b in pairs if a.distance <= MAX_HAMMING and a.distance < RATIO * b.distance]
    m, q = cand[[a.trainIdx for a in good]], np.array([a.queryIdx for a in good], int)
    if len(m) < MIN_PNP_INLIERS:
        return _not_recovered(f'{len(m)} feature matches in the retrieved keyframes < {MIN_PNP_INLIERS}', points=len(m))
    T, inl = _pnp_ransac(place.feature_points[m].astype(np.float64), uv[q].astype(np.float64), K,
                         PNP_ERROR_PX * image.shape[1] / 320.0)
    if T is None:
        return _not_recovered(f'{len(inl)} PnP inliers of {len(m)} matches < {MIN_PNP_INLIERS}', points=len(m))
    if found is not None and not _apart(found, T):
        return _not_recovered('the pose found already', points=len(m))
    # The RANSAC pose is a start, not a prior: how far the verification moves it is not a test here.
    r = refine_features(place, T, image, K, np.eye(6) * 1e6, max_correction=(np.inf, 180.0), features=(uv, des))
    r.method = 'recovery'
    if not r.accepted:
        r.reason = f'verification of the retrieved pose: {r.reason}'
    return r


def recover(place: PlaceMap, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None,
            candidates: int = RECOVERY_CANDIDATES,
            features: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> Refinement:
    """A pose from the image alone (and its depth), wherever the camera is in the mapped place.

    image (H, W, 3) uint8 RGB, K (3, 3) of it; depth (H', W') metres registered to it, or None.
    The bag-of-words vector of the image's ORB features retrieves `candidates` keyframes; the features are matched
    (Hamming nearest neighbour, ratio test) to the map features those keyframes saw, PnP-RANSAC (P3P) gives
    a pose, and refine_features from it must accept (its covariance test). Then, for a place that repeats itself
    (alike rooms): the best `candidates` keyframes more than REPEAT_M from that pose are searched the same way,
    and where they give a verified pose REPEAT_M or REPEAT_DEG away from it, neither is taken. With a depth image
    and map surfaces, ICP from the pose then refines it when it accepts. Refinement.method is 'recovery'
    (+ '+icp'). features: gives the image's query_features where the caller shares them (see refine).
    """
    if not len(place.keyframe_bow):
        return _not_recovered('the map has no keyframes (built before map version 2: rebuild it with `globloc map`)')
    H, W = image.shape[:2]
    uv, des = query_features(place, image) if features is None else features()
    if len(des) < MIN_PNP_INLIERS:
        return _not_recovered(f'{len(des)} image features < {MIN_PNP_INLIERS}')
    scores = place.keyframe_bow.astype(np.float32) @ bow_vector(des, place.vocabulary, place.idf)
    ranked = np.argsort(-scores, kind='stable')
    r = _recover_from(place, ranked[:candidates], image, K, uv, des)
    if not r.accepted:
        return r
    away = np.linalg.norm(place.keyframe_poses[ranked, :3, 3] - r.T_map_cam[:3, 3], axis=1) > REPEAT_M
    elsewhere = _recover_from(place, ranked[away][:candidates], image, K, uv, des, found=r.T_map_cam)
    if elsewhere.accepted and (gap := _apart(r.T_map_cam, elsewhere.T_map_cam)):
        moved_m, turned_deg = gap
        r.accepted = False
        r.reason = f'the place repeats itself: the frame also fits the map {moved_m:.2f} m / {turned_deg:.1f} deg away'
        return r
    if depth is not None and len(place.points) >= MIN_POINTS:
        Kd = scale_intrinsics(K, depth.shape[1] / W, depth.shape[0] / H)
        icp = refine_icp(place, r.T_map_cam, depth, Kd, r.covariance)
        if icp.accepted:
            icp.method = 'recovery+icp'
            return icp
    return r

