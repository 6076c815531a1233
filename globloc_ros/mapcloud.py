"""The place's surfaces as a point cloud, and the RGB-D pose refinement against it. Never imports rclpy.

The one-shot alignment (align.py) gives T_map_cam from the network's scene coordinates, a few cm off. With a
depth camera the measured surface can then be registered to the mapped surface: point-to-plane ICP from that
pose, against a map cloud built once from the training bags' recorded depth and poses (`globloc map`).

    cloud = build_map((f.depth, f.K, f.T_map_cam) for f in frames)   # map frame, voxel-averaged
    save_map(cloud, 'place.map.npz'); cloud = load_map('place.map.npz')
    r = refine_pose(cloud, T_map_cam, depth, K, prior_covariance)    # r.accepted -> r.T_map_cam

Fail-safe rules of refine_pose: directions the visible surfaces do not constrain (a single wall leaves
three) keep the one-shot pose; a refinement with too few points on the map or a correction larger than the
one-shot error can be is rejected, and the caller keeps the one-shot pose.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy.spatial import cKDTree

MAP_FORMAT = 'globloc-map-cloud'
MAP_VERSION = 1
VOXEL_M = 0.02
# Correspondence distance per ICP iteration: coarse to fine, then up to 18 more at 5 cm until the update is
# below 1e-6. A tighter last gate (2-3 cm) made real depth (SUN3D) converge less consistently from different starts.
GATES_M = (0.2, 0.1, *[0.05] * 18)
MIN_EIGENVALUE = 1e-3  # of the per-point normal matrix A^T A / N: below it a direction is not constrained
MIN_POINTS = 50
MIN_INLIER_FRACTION = 0.5
MAX_CORRECTION = (0.3, 10.0)  # metres, degrees: a one-shot pose this far off would not have passed its gate
MAX_QUERY_POINTS = 1000  # depth points per frame; 600 doubled the worst errors, 1500 cost twice the time on 640x480


class MapError(RuntimeError):
    """A map cloud file that cannot be used; the message names the file and the problem."""


@dataclass
class MapCloud:
    """points, normals (N, 3) float32: voxel centroids in the map frame (metres) and unit surface normals.
    voxel: edge of the averaging voxel (m). meta: where it came from (bags, frames)."""
    points: np.ndarray
    normals: np.ndarray
    voxel: float
    meta: dict = field(default_factory=dict)

    @cached_property
    def tree(self) -> cKDTree:
        return cKDTree(self.points)


@dataclass
class Refinement:
    """refine_pose's answer. T_map_cam (4, 4): refined when accepted, else the pose given.
    covariance (6, 6): x, y, z, roll, pitch, yaw (fixed map axes, about the camera centre), as in
    PoseWithCovariance. constrained: how many of the 6 pose directions the surfaces pinned (the others kept the
    pose given). inlier_fraction: share of the depth points within the last gate of the map; rms_m their
    point-to-plane RMS; reason: '' when accepted, else why not."""
    T_map_cam: np.ndarray
    accepted: bool
    reason: str
    covariance: np.ndarray
    inlier_fraction: float = 0.0
    rms_m: float = float('nan')
    constrained: int = 0
    points: int = 0


def depth_points(depth: np.ndarray, K: np.ndarray, stride: int) -> np.ndarray:
    """depth (H, W) metres along the optical axis (NaN / <= 0: not measured), K (3, 3) of that image ->
    camera-frame points (h, w, 3) of every stride-th pixel (NaN where not measured)."""
    d = np.asarray(depth, np.float64)[::stride, ::stride]
    d = np.where(np.isfinite(d) & (d > 0), d, np.nan)
    v, u = np.mgrid[0:depth.shape[0]:stride, 0:depth.shape[1]:stride].astype(np.float64)
    return np.stack([(u - K[0, 2]) / K[0, 0] * d, (v - K[1, 2]) / K[1, 1] * d, d], -1)


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
        edge = (np.linalg.norm(dx, axis=-1) > max_step * X[..., 2]) | (np.linalg.norm(dy, axis=-1) > max_step * X[..., 2])
    n[edge] = np.nan
    return n


def build_map(views: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], voxel: float = VOXEL_M, stride: int = 2,
              meta: dict | None = None) -> MapCloud:
    """views: (depth (H, W) metres, K (3, 3), T_map_cam (4, 4)) per recorded frame -> MapCloud: every stride-th
    pixel's point and normal in the map frame, averaged per voxel (m). Views without depth are skipped.
    Accumulates voxel sums as it goes, so memory follows the map's size, not the number of frames."""
    if not voxel > 0:
        raise ValueError(f'voxel must be > 0 m, got {voxel}')
    keys = np.zeros(0, np.int64)
    sums = np.zeros((0, 7))  # point xyz, normal xyz, count
    pending: list[np.ndarray] = []

    def reduce(keys, sums, chunk):
        P = np.concatenate(chunk)
        k = np.concatenate([keys, _voxel_keys(P[:, :3], voxel)])
        s = np.concatenate([sums, np.concatenate([P, np.ones((len(P), 1))], 1)])
        k, inv = np.unique(k, return_inverse=True)
        out = np.zeros((len(k), 7))
        np.add.at(out, inv, s)
        return k, out

    for depth, K, T in views:
        if depth is None:
            continue
        X = depth_points(depth, K, stride)
        n = surface_normals(X)
        ok = np.isfinite(X).all(-1) & np.isfinite(n).all(-1)
        R, t = T[:3, :3], T[:3, 3]
        pending.append(np.concatenate([X[ok] @ R.T + t, n[ok] @ R.T], 1))
        if sum(len(p) for p in pending) > 2_000_000:
            keys, sums = reduce(keys, sums, pending)
            pending = []
    if pending:
        keys, sums = reduce(keys, sums, pending)
    if not len(sums):
        raise ValueError('no recorded depth to build a map from')
    points = sums[:, :3] / sums[:, 6:]
    normals = sums[:, 3:6]
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    consistent = norm[:, 0] > 0.5 * sums[:, 6]  # views of the voxel agree on which way the surface faces
    normals = normals / np.maximum(norm, 1e-12)
    return MapCloud(points[consistent].astype(np.float32), normals[consistent].astype(np.float32), float(voxel),
                    dict(meta or {}, voxels=int(consistent.sum()), observations=int(sums[:, 6].sum())))


def _voxel_keys(P: np.ndarray, voxel: float) -> np.ndarray:
    """(N, 3) metres -> (N,) int64 voxel ids; 2^21 voxels per axis around the origin (42 km at 2 cm)."""
    q = np.floor(P / voxel).astype(np.int64) + (1 << 20)
    if q.min(initial=0) < 0 or q.max(initial=0) >= (1 << 21):
        raise ValueError(f'map extends beyond +-{voxel * (1 << 20):.0f} m of the origin at voxel {voxel} m')
    return (q[:, 0] << 42) | (q[:, 1] << 21) | q[:, 2]


def save_map(cloud: MapCloud, path: str | os.PathLike) -> None:
    """Write an .npz atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez_compressed(f, points=cloud.points, normals=cloud.normals.astype(np.float16),
                                header=json.dumps({'format': MAP_FORMAT, 'version': MAP_VERSION,
                                                   'voxel': cloud.voxel, 'meta': cloud.meta}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_map(path: str | os.PathLike) -> MapCloud:
    """Read and check a map cloud written by save_map. Raises MapError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise MapError(f'map cloud not found: {path} (build one with `globloc map`)')
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z['header']))
            points, normals = z['points'], z['normals'].astype(np.float32)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise MapError(f'{path}: not a globloc map cloud ({e})') from e
    if header.get('format') != MAP_FORMAT:
        raise MapError(f'{path}: format {header.get("format")!r} is not {MAP_FORMAT!r}')
    if header.get('version') != MAP_VERSION:
        raise MapError(f'{path}: map version {header.get("version")} is not {MAP_VERSION}; rebuild it with '
                       '`globloc map`')
    if points.ndim != 2 or points.shape[1] != 3 or normals.shape != points.shape or len(points) < MIN_POINTS:
        raise MapError(f'{path}: points {points.shape} and normals {normals.shape} must be (N, 3), N >= {MIN_POINTS}')
    if not (np.isfinite(points).all() and np.isfinite(normals).all()):
        raise MapError(f'{path}: points or normals are not finite')
    return MapCloud(points.astype(np.float32), normals, float(header['voxel']), header.get('meta', {}))


def _rotation(w: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation vector (3,) rad -> (3, 3)."""
    th = np.linalg.norm(w)
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]]) / max(th, 1e-12)
    return np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * k @ k


# Result covariance order (x, y, z, roll, pitch, yaw) from the ICP parameters (rotation (3), translation (3)).
_TO_ROS = np.array([3, 4, 5, 0, 1, 2])


def refine_pose(cloud: MapCloud, T_map_cam: np.ndarray, depth: np.ndarray, K: np.ndarray,
                prior_covariance: np.ndarray, gates_m: tuple[float, ...] = GATES_M,
                max_points: int = MAX_QUERY_POINTS, min_inlier_fraction: float = MIN_INLIER_FRACTION,
                max_correction: tuple[float, float] = MAX_CORRECTION) -> Refinement:
    """Point-to-plane ICP of a measured depth image against the map, from T_map_cam (4, 4).

    depth (H, W) metres (NaN / <= 0: not measured) with K (3, 3) of that depth image; prior_covariance (6, 6) of
    T_map_cam (x, y, z, roll, pitch, yaw), kept in the directions the surfaces do not constrain.
    Each iteration pairs each depth point (at most max_points, on a grid) with its nearest map point within the
    gate and solves for a rotation about the camera centre and a translation, in the eigenbasis of A^T A keeping
    only directions with mean sensitivity >= MIN_EIGENVALUE (m^2 per m^2 or per rad^2).
    Covariance of the refined directions: sigma^2 (A^T A)^-1 with sigma^2 = mean squared residual + voxel^2 / 12
    (the map's own quantisation), residuals taken as independent.
    """
    T0 = np.asarray(T_map_cam, np.float64)
    keep_pose = lambda reason, **kw: Refinement(T0, False, reason, prior_covariance, **kw)  # noqa: E731
    stride = max(1, int(np.ceil(np.sqrt(depth.size / max_points))))
    X = depth_points(depth, K, stride).reshape(-1, 3)
    X = X[np.isfinite(X).all(1)]
    if len(X) < MIN_POINTS:
        return keep_pose(f'{len(X)} depth points < {MIN_POINTS}', points=len(X))
    R, c = T0[:3, :3].copy(), T0[:3, 3].copy()
    for gate in gates_m:
        P = X @ R.T + c
        dist, j = cloud.tree.query(P, distance_upper_bound=gate)
        hit = np.isfinite(dist)
        if hit.sum() < MIN_POINTS:
            return keep_pose(f'{hit.sum()} of {len(X)} depth points within {gate:g} m of the map', points=len(X),
                             inlier_fraction=float(hit.mean()))
        p, n = P[hit], cloud.normals[j[hit]].astype(np.float64)
        r = np.sum((p - cloud.points[j[hit]]) * n, 1)
        A = np.concatenate([np.cross(p - c, n), n], 1)
        lam, V = np.linalg.eigh(A.T @ A / len(r))
        pinned = lam >= MIN_EIGENVALUE
        x = -V[:, pinned] @ ((V[:, pinned].T @ (A.T @ r / len(r))) / lam[pinned])
        R, c = _rotation(x[:3]) @ R, c + x[3:]
        if np.abs(x).max() < 1e-6:
            break
    dist, j = cloud.tree.query(X @ R.T + c, distance_upper_bound=gates_m[-1])
    hit = np.isfinite(dist)
    inliers = float(hit.mean())
    res = np.sum((X[hit] @ R.T + c - cloud.points[j[hit]]) * cloud.normals[j[hit]], 1)
    rms = float(np.sqrt(np.mean(res ** 2))) if hit.any() else float('nan')
    stats = dict(inlier_fraction=inliers, rms_m=rms, constrained=int(pinned.sum()), points=len(X))
    moved_m = float(np.linalg.norm(c - T0[:3, 3]))
    turned_deg = float(np.degrees(np.arccos(np.clip((np.trace(R @ T0[:3, :3].T) - 1) / 2, -1, 1))))
    if not (np.isfinite(R).all() and np.isfinite(c).all()):
        return keep_pose('refined pose not finite', **stats)
    if inliers < min_inlier_fraction:
        return keep_pose(f'{inliers:.0%} of the depth points on the map < {min_inlier_fraction:.0%}', **stats)
    if moved_m > max_correction[0] or turned_deg > max_correction[1]:
        return keep_pose(f'correction {moved_m:.2f} m / {turned_deg:.1f} deg exceeds {max_correction[0]:g} m / '
                         f'{max_correction[1]:g} deg', **stats)
    sigma2 = rms ** 2 + cloud.voxel ** 2 / 12
    Vp, Vu = V[:, pinned], V[:, ~pinned]
    cov = Vp @ np.diag(sigma2 / (len(res) * lam[pinned])) @ Vp.T
    prior = np.asarray(prior_covariance, np.float64)[np.ix_(np.argsort(_TO_ROS), np.argsort(_TO_ROS))]
    cov = cov + Vu @ Vu.T @ prior @ Vu @ Vu.T
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, c
    return Refinement(T, True, '', cov[np.ix_(_TO_ROS, _TO_ROS)], **stats)
