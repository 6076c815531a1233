"""Differentiable weighted rigid alignment: the pose in one shot (METHOD.md section 3).

Find R, t minimising sum_i w_i ||R X_cam_i + t - X_map_i||^2. Two solvers:
- 'svd': the reference (roma's weighted Procrustes, SVD inside);
- 'horn': Horn's quaternion method, the top eigenvector of the 4x4 matrix N found by repeated
  squaring of N + alpha*I. Only matmul, add, div, sqrt, so it exports to ONNX and TensorRT.

Degenerate input (NaN points, zero weights, a single point, collinear points) gives a finite pose
and confident=False, never NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import roma
import torch

HORN_SQUARINGS = 16  # the eigengap ratio r of N + alpha*I shrinks as r**(2**k): r**65536 is 0 for any usable gap
MIN_POINTS = 3.0  # effective point count below which a pose is not trusted
MIN_SPREAD_RATIO = 1e-4  # (second principal variance / total variance) below this = collinear
_EPS = 1e-12


class Alignment(NamedTuple):
    """R (B, 3, 3), t (B, 3): T_map_cam. residual (B,) weighted RMS in metres; n_eff (B,) = 1/sum w^2;
    spread (B,) weighted RMS distance (m) of camera points from their centroid; confident (B,) bool."""
    R: torch.Tensor
    t: torch.Tensor
    residual: torch.Tensor
    n_eff: torch.Tensor
    spread: torch.Tensor
    confident: torch.Tensor


def align_weighted(cam_pts: torch.Tensor, map_pts: torch.Tensor, weights: torch.Tensor,
                   solver: str = 'horn') -> Alignment:
    """Weighted rigid alignment of camera-frame points onto map-frame points.

    cam_pts (B, N, 3) camera frame, map_pts (B, N, 3) map frame, weights (B, N) >= 0 (any scale).
    Returns an Alignment whose R, t map camera points into the map: X_map = R X_cam + t.
    """
    finite = torch.isfinite(cam_pts).all(-1) & torch.isfinite(map_pts).all(-1) & torch.isfinite(weights)
    zero = torch.zeros_like(cam_pts)
    cam = torch.where(finite[..., None], cam_pts, zero)
    mp = torch.where(finite[..., None], map_pts, zero)
    w = torch.where(finite, weights.clamp(min=0.0), torch.zeros_like(weights))
    w_sum = w.sum(-1, keepdim=True)
    w = w / (w_sum + _EPS)

    mu_c = (w[..., None] * cam).sum(1)
    mu_m = (w[..., None] * mp).sum(1)
    P = cam - mu_c[:, None]
    Q = mp - mu_m[:, None]
    if solver == 'horn':
        R = _horn_rotation((w[..., None] * P).transpose(1, 2) @ Q)
    elif solver == 'svd':
        R = _svd_rotation(P, Q, w)
    else:
        raise ValueError(f"solver must be 'horn' or 'svd', got {solver!r}")
    t = mu_m - (R @ mu_c[..., None])[..., 0]

    err = ((cam @ R.transpose(1, 2) + t[:, None]) - mp).square().sum(-1)
    residual = torch.sqrt((w * err).sum(-1) + _EPS)
    n_eff = 1.0 / (w.square().sum(-1) + _EPS)
    C = (w[..., None] * P).transpose(1, 2) @ P  # weighted covariance of the camera points
    total = C[:, 0, 0] + C[:, 1, 1] + C[:, 2, 2]
    spread = torch.sqrt(total + _EPS)
    confident = (w_sum[:, 0] > 1e-9) & (n_eff >= MIN_POINTS) & \
        (_second_variance(C) > MIN_SPREAD_RATIO * total.square()) & \
        torch.isfinite(R).all(-1).all(-1) & torch.isfinite(t).all(-1)
    return Alignment(R, t, residual, n_eff, spread, confident)


def _second_variance(C: torch.Tensor) -> torch.Tensor:
    """Sum of the 2x2 principal minors of C (B, 3, 3) = l1 l2 + l1 l3 + l2 l3: zero when collinear."""
    a, b, c = C[:, 0, 0], C[:, 1, 1], C[:, 2, 2]
    return a * b + a * c + b * c - C[:, 0, 1].square() - C[:, 0, 2].square() - C[:, 1, 2].square()


def _svd_rotation(P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference: roma's weighted Procrustes of centred points P -> Q, reflection fixed."""
    # roma normalises the weights itself: give it uniform ones where all are zero (P = Q = 0 there).
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
    R, _ = roma.rigid_points_registration(P, Q, weights=w)
    return R


def _horn_rotation(H: torch.Tensor) -> torch.Tensor:
    """Rotation from the cross-covariance H = sum w P Q^T (B, 3, 3) by Horn's quaternion method.

    N (B, 4, 4) is symmetric; its top eigenvector is the quaternion (w, x, y, z) of R. Shifting by
    alpha = ||N||_F + eps makes the spectrum positive; k squarings with renormalisation turn
    N + alpha*I into (nearly) the projector onto that eigenvector, whose largest column is
    proportional to it.
    """
    Sxx, Sxy, Sxz = H[:, 0, 0], H[:, 0, 1], H[:, 0, 2]
    Syx, Syy, Syz = H[:, 1, 0], H[:, 1, 1], H[:, 1, 2]
    Szx, Szy, Szz = H[:, 2, 0], H[:, 2, 1], H[:, 2, 2]
    N = torch.stack([
        torch.stack([Sxx + Syy + Szz, Syz - Szy, Szx - Sxz, Sxy - Syx], -1),
        torch.stack([Syz - Szy, Sxx - Syy - Szz, Sxy + Syx, Szx + Sxz], -1),
        torch.stack([Szx - Sxz, Sxy + Syx, -Sxx + Syy - Szz, Syz + Szy], -1),
        torch.stack([Sxy - Syx, Szx + Sxz, Syz + Szy, -Sxx - Syy + Szz], -1),
    ], -2)
    alpha = torch.sqrt(N.square().sum((-1, -2)) + _EPS)
    eye = torch.eye(4, dtype=H.dtype, device=H.device)
    M = N + alpha[:, None, None] * eye
    for _ in range(HORN_SQUARINGS):
        M = M / torch.sqrt(M.square().sum((-1, -2), keepdim=True) + _EPS)
        M = M @ M
    # Column j of the projector q q^T is q_j q; take the one with the largest diagonal q_j^2.
    # (a one-hot matmul rather than gather: it exports to plain ArgMax/Equal/MatMul)
    j = (M * eye).sum(-1).argmax(-1, keepdim=True)  # the diagonal (.diagonal() exports with an If)
    one_hot = (torch.arange(4, device=H.device)[None] == j).to(H.dtype)
    q = (M @ one_hot[..., None])[..., 0]
    q = q / torch.sqrt(q.square().sum(-1, keepdim=True) + _EPS)
    return _quat_wxyz_to_rotmat(q)


def _quat_wxyz_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (B, 4) as (w, x, y, z) -> (B, 3, 3). Written out rather than roma's
    unitquat_to_rotmat, whose reshapes export to ONNX with an If node that TensorRT dislikes."""
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], -1).view(-1, 3, 3)


def pose_covariance(residual: torch.Tensor, spread: torch.Tensor, floor_m: float = 0.005) -> torch.Tensor:
    """A 6x6 covariance (x, y, z, roll, pitch, yaw order, as in PoseWithCovariance) per pose.

    Isotropic: position std = the weighted RMS residual (floored), rotation std = residual / spread (rad). The
    cells' errors are not independent (the depth head errs by one scale per frame, neighbouring cells share what
    they see), so they do not average down with the number of cells: on the synthetic held-out pass the one-shot
    position error is a median 1.4x and a 95th percentile 2.2x the residual, while residual / sqrt(n_eff), the
    independent-noise figure, was 17x too small.
    residual, spread (B,) metres -> (B, 6, 6).
    """
    var_t = residual.clamp(min=floor_m).square()
    var_r = var_t / spread.clamp(min=1e-3).square()
    diag = torch.stack([var_t, var_t, var_t, var_r, var_r, var_r], -1)
    return torch.diag_embed(diag)
