"""Frame conventions: the one place that says how poses, quaternions, intrinsics and pixels are laid out.

- Camera frame = ROS optical frame = OpenCV: x right, y down, z forward.
- A pose is T_map_cam (4x4): X_map = R @ X_cam + t; t is the camera centre in the map. Metres.
- Quaternions crossing an API are (x, y, z, w), as in ROS messages and roma. transforms3d uses
  (w, x, y, z) internally; the conversion happens only in this module.
- Pixel (u, v) has its origin at the centre of the top-left pixel. A stride-s feature map's cell
  (i, j) sits at u = s*j + (s-1)/2, v = s*i + (s-1)/2 in input pixels.
- Resizing by (sx, sy) maps pixel centres as u' = (u + 0.5) * sx - 0.5, so fx' = fx*sx and
  cx' = (cx + 0.5)*sx - 0.5 (likewise y). METHOD.md states the plain cx*sx; the pixel-centre rule
  is the exact one under our pixel convention and agrees with the cell-centre formula above.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import transforms3d.quaternions as t3q

if TYPE_CHECKING:  # torch is imported inside the tensor functions, so that what needs numpy alone (placemap:
    import torch   # loading a map, refining against it) loads without it

DEPTH_EDGE_RATIO = 0.05  # four depth pixels differing by more than 5 % straddle an edge: no depth label there


def quat_xyzw_to_matrix(q_xyzw: np.ndarray) -> np.ndarray:
    """(4,) quaternion (x, y, z, w) -> (3, 3) rotation. Raises ValueError unless finite and unit (1e-3)."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    if q.shape != (4,) or not np.all(np.isfinite(q)):
        raise ValueError(f'quaternion must be 4 finite numbers (x, y, z, w), got {q.tolist()}')
    norm = np.linalg.norm(q)
    if abs(norm - 1.0) > 1e-3:
        raise ValueError(f'quaternion (x, y, z, w) {q.tolist()} is not unit (norm {norm:.6f})')
    return t3q.quat2mat([q[3], q[0], q[1], q[2]])


def matrix_to_quat_xyzw(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (4,) unit quaternion (x, y, z, w) with w >= 0."""
    w, x, y, z = t3q.mat2quat(np.asarray(R, dtype=np.float64))
    q = np.array([x, y, z, w])
    return q if w >= 0 else -q


def pose_matrix(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """R (3, 3), t (3,) -> T (4, 4)."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def pose_from_xyz_quat(xyz, q_xyzw) -> np.ndarray:
    """Position (3,) and quaternion (x, y, z, w) -> T (4, 4)."""
    return pose_matrix(quat_xyzw_to_matrix(q_xyzw), np.asarray(xyz, dtype=np.float64))


def pose_to_xyz_quat(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T (4, 4) -> position (3,), quaternion (x, y, z, w)."""
    return T[:3, 3].copy(), matrix_to_quat_xyzw(T[:3, :3])


def invert_pose(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (..., 4, 4) transform without a general matrix inverse."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Ti = np.zeros_like(T)
    Ti[..., :3, :3] = np.swapaxes(R, -1, -2)
    Ti[..., :3, 3:] = -np.swapaxes(R, -1, -2) @ t
    Ti[..., 3, 3] = 1.0
    return Ti


def relative_pose(T_map_i: np.ndarray, T_map_j: np.ndarray) -> np.ndarray:
    """T_i_j = T_map_i^-1 T_map_j: camera j's pose in camera i's frame."""
    return invert_pose(T_map_i) @ T_map_j


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K (3, 3) of an image resized by (sx, sy) (pixel-centre rule, see module docstring)."""
    K2 = np.array(K, dtype=np.float64, copy=True)
    K2[0, 0] *= sx
    K2[1, 1] *= sy
    K2[0, 2] = (K2[0, 2] + 0.5) * sx - 0.5
    K2[1, 2] = (K2[1, 2] + 0.5) * sy - 0.5
    return K2


def cell_centres(h: int, w: int, stride: int, device=None, dtype=None) -> torch.Tensor:
    """Pixel coordinates (h*w, 2) as (u, v) of the cells of a stride-s map, row-major over (i, j); dtype
    default torch.float32."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    v = torch.arange(h, device=device, dtype=dtype) * stride + (stride - 1) / 2
    u = torch.arange(w, device=device, dtype=dtype) * stride + (stride - 1) / 2
    vv, uu = torch.meshgrid(v, u, indexing='ij')
    return torch.stack([uu.reshape(-1), vv.reshape(-1)], dim=-1)


def backproject(depth: torch.Tensor, uv: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame points X_cam = d * K^-1 [u, v, 1]^T.

    depth (B, N) metres, uv (N, 2) or (B, N, 2) pixels, K (B, 3, 3) -> (B, N, 3).
    Written with the four intrinsics (no matrix inverse op) so that it exports to ONNX/TensorRT.
    """
    import torch
    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
    u, v = uv[..., 0], uv[..., 1]
    return torch.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], dim=-1)


def _cell_centres_in_recorded(sx: float, sy: float, h: int, w: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of an (h, w) stride-s grid on an input image resized by (sx, sy) from the recorded one, in
    recorded pixels: u (w,), v (h,). Cell (i, j) sits at input pixel (s j + (s-1)/2, s i + (s-1)/2), i.e. at
    recorded pixel ((u + 0.5)/sx - 0.5, ...)."""
    u = (np.arange(w) * stride + (stride - 1) / 2 + 0.5) / sx - 0.5
    v = (np.arange(h) * stride + (stride - 1) / 2 + 0.5) / sy - 0.5
    return u, v


def depth_at_cells(depth: np.ndarray, sx: float, sy: float, h: int, w: int, stride: int) -> np.ndarray:
    """Recorded depth (h0, w0) metres (NaN invalid) -> (h, w) at the input image's cell centres.

    Cell (i, j) sits at input pixel (s j + (s-1)/2, s i + (s-1)/2), i.e. at recorded pixel ((u + 0.5)/sx - 0.5, ...).
    Bilinear over the four neighbours; NaN if any is invalid or they differ by more than DEPTH_EDGE_RATIO.
    stride 1 gives the depth at every input pixel.
    """
    h0, w0 = depth.shape
    u, v = _cell_centres_in_recorded(sx, sy, h, w, stride)
    u = np.clip(u, 0, w0 - 1)
    v = np.clip(v, 0, h0 - 1)
    u0 = np.minimum(np.floor(u).astype(int), w0 - 2) if w0 > 1 else np.zeros(w, int)
    v0 = np.minimum(np.floor(v).astype(int), h0 - 2) if h0 > 1 else np.zeros(h, int)
    fu, fv = u - u0, v - v0
    u1, v1 = np.minimum(u0 + 1, w0 - 1), np.minimum(v0 + 1, h0 - 1)
    d00, d01 = depth[v0][:, u0], depth[v0][:, u1]
    d10, d11 = depth[v1][:, u0], depth[v1][:, u1]
    quad = np.stack([d00, d01, d10, d11])
    ok = np.all(np.isfinite(quad), 0)
    with np.errstate(invalid='ignore'):
        ok &= (quad.max(0) - quad.min(0)) <= DEPTH_EDGE_RATIO * quad.min(0)  # NaN: False
        out = ((1 - fv)[:, None] * ((1 - fu) * d00 + fu * d01) + fv[:, None] * ((1 - fu) * d10 + fu * d11))
    return np.where(ok, out, np.nan).astype(np.float32)


def measured_depth_at_cells(depth: np.ndarray, sx: float, sy: float, h: int, w: int, stride: int) -> np.ndarray:
    """A sensor's depth (h0, w0) metres (NaN invalid) -> (h, w) at the input image's cell centres, robust to noise.

    A depth camera's pixels are noisy one by one (a Kinect: about 1 % of the depth plus 2.85 mm z^2, z in metres).
    Each cell takes the median of a square window of recorded pixels centred on its centre, about a third of the
    cell's footprint wide (at least 2x2). NaN where under half of the window is valid or where its interquartile
    range exceeds DEPTH_EDGE_RATIO of the median (the window straddles a depth edge).
    """
    h0, w0 = depth.shape
    r = max(1, round(stride / (6 * min(sx, sy))))  # half-width in recorded pixels: window 2r x 2r
    u, v = _cell_centres_in_recorded(sx, sy, h, w, stride)
    off = np.arange(-r + 1, r + 1)  # pixels floor(c) - r + 1 .. floor(c) + r: centred on c + 0.5 - frac(c)
    uu = np.clip(np.floor(u).astype(int)[:, None] + off, 0, w0 - 1)  # (w, 2r)
    vv = np.clip(np.floor(v).astype(int)[:, None] + off, 0, h0 - 1)  # (h, 2r)
    win = depth[vv[:, None, :, None], uu[None, :, None, :]].reshape(h, w, -1)  # (h, w, 4r^2)
    n = np.isfinite(win).sum(-1, keepdims=True)  # (h, w, 1) valid pixels; NaN sorts last
    srt = np.sort(win, axis=-1)

    def at(i: np.ndarray) -> np.ndarray:  # the i-th smallest valid pixel of each window
        return np.take_along_axis(srt, np.maximum(i, 0), -1)[..., 0]

    q25, q75, med = at((n - 1) // 4), at(3 * (n - 1) // 4), (at((n - 1) // 2) + at(n // 2)) / 2
    ok = (n[..., 0] * 2 >= win.shape[-1]) & (q75 - q25 <= DEPTH_EDGE_RATIO * med)
    return np.where(ok, med, np.nan).astype(np.float32)


def project(X_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (N, 3) -> pixels (N, 2) and depth z (N,)."""
    z = X_cam[:, 2]
    uv = (X_cam @ K.T)[:, :2] / z[:, None]
    return uv, z


def rotation_error_deg(R_est: np.ndarray, R_gt: np.ndarray) -> np.ndarray:
    """Angle (degrees) between (..., 3, 3) rotations, from ||R_est - R_gt||_F = 2 sqrt(2) sin(a / 2):
    accurate for tiny angles, where the trace formula loses ~0.03 deg to rounding of float32 rotations."""
    d = np.linalg.norm(np.asarray(R_est, np.float64) - np.asarray(R_gt, np.float64), axis=(-2, -1))
    return np.degrees(2.0 * np.arcsin(np.clip(d / (2.0 * np.sqrt(2.0)), 0.0, 1.0)))


def pose_errors(T_est: np.ndarray, T_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translation error (m) and rotation error (deg) of (..., 4, 4) poses T_map_cam."""
    dt = np.linalg.norm(T_est[..., :3, 3] - T_gt[..., :3, 3], axis=-1)
    return dt, rotation_error_deg(T_est[..., :3, :3], T_gt[..., :3, :3])
