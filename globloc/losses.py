"""Training losses (METHOD.md section 4). Every loss returns one value per image or per tuple, shape (B,), so that
a batch mean is the same whether the batch is split across distributed ranks or not.

- scene_coord_loss: L_sc, robust Euclidean error of the predicted scene coordinates at the sparse labels;
- dense_scene_coord_loss: the same at every cell with recorded depth (labels from depth and pose, --sc-labels dense);
- depth_loss: L_depth, |d - d_gt| at the cells with valid depth;
- pose_loss: L_pose, ||t - t_gt|| + beta * angle(R, R_gt) of the aligned pose;
- relative_pose_loss: L_adj / L_dist, the same error between T_i^-1 T_j of two predicted poses and the edge's
  measured relative pose.
All distances in metres, angles in radians; beta in metres per radian.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from globloc_ros import frames as fr

_EPS = 1e-12


def robust_distance(err: torch.Tensor, tau: float) -> torch.Tensor:
    """Clamped L1 of a distance: err below tau, sqrt(tau * err) above (continuous, gradient shrinking as
    1/sqrt(err)), so outlier labels (depth edges, bad landmarks) cannot dominate while far-off predictions
    early in training still get a gradient (a hard clamp would give them none)."""
    return torch.where(err <= tau, err, torch.sqrt(tau * err.clamp(min=tau)))


def sample_cells(maps: torch.Tensor, uv: torch.Tensor, stride: int) -> torch.Tensor:
    """Bilinear sample of a stride-s map at pixels.

    maps (B, C, h, w) with cell (i, j) at pixel (s j + (s-1)/2, s i + (s-1)/2); uv (B, M, 2) input-image pixels
    -> (B, M, C). Pixels outside the outermost cell centres take the border cell's value.
    """
    B, C, h, w = maps.shape
    j = (uv[..., 0] - (stride - 1) / 2) / stride
    i = (uv[..., 1] - (stride - 1) / 2) / stride
    grid = torch.stack([2 * j / max(w - 1, 1) - 1, 2 * i / max(h - 1, 1) - 1], -1)[:, :, None]  # (B, M, 1, 2)
    out = F.grid_sample(maps, grid, mode='bilinear', padding_mode='border', align_corners=True)
    return out[..., 0].transpose(1, 2)


def scene_coord_loss(scene_coords: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, stride: int,
                     tau: float) -> torch.Tensor:
    """L_sc per image (B,): mean robust Euclidean error (m) at the labelled pixels; 0 for an image without labels.

    scene_coords (B, 3, h, w) map frame; labels (B, M, 5) x y z (map) u v (input pixels); mask (B, M) bool.
    """
    pred = sample_cells(scene_coords, labels[..., 3:5], stride)
    err = torch.sqrt((pred - labels[..., :3]).square().sum(-1) + _EPS)
    m = mask.to(err.dtype)
    return (robust_distance(err, tau) * m).sum(1) / m.sum(1).clamp(min=1.0)


def dense_labels(depth: torch.Tensor, K: torch.Tensor, T_map_cam: torch.Tensor, stride: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene-coordinate labels at every cell from its depth: X_map = T_map_cam (d K^-1 [u, v, 1]) at the cell
    centres. depth (B, h, w) metres at the cells (NaN: none), K (B, 3, 3) of the input image, T_map_cam (B, 4, 4)
    -> (labels (B, 3, h, w) map frame, valid (B, h, w) bool)."""
    B, h, w = depth.shape
    valid = torch.isfinite(depth) & (depth > 0)
    uv = fr.cell_centres(h, w, stride, device=depth.device, dtype=depth.dtype)
    X = fr.backproject(torch.where(valid, depth, torch.ones_like(depth)).view(B, -1), uv, K)  # (B, hw, 3)
    X = X @ T_map_cam[:, :3, :3].transpose(1, 2) + T_map_cam[:, None, :3, 3]
    return X.transpose(1, 2).reshape(B, 3, h, w), valid


def dense_scene_coord_loss(scene_coords: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, T_map_cam: torch.Tensor,
                           stride: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_sc per image (B,) at every cell with depth (dense_labels), and which images had any (B,) bool.

    scene_coords (B, 3, h, w) map frame; depth (B, h, w) at the same cells; K, T_map_cam as in dense_labels.
    """
    labels, valid = dense_labels(depth, K, T_map_cam, stride)
    err = torch.sqrt((scene_coords - labels).square().sum(1) + _EPS)
    m = valid.to(err.dtype)
    n = m.flatten(1).sum(1)
    return (robust_distance(err, tau) * m).flatten(1).sum(1) / n.clamp(min=1.0), n > 0


def depth_loss(depth: torch.Tensor, depth_gt: torch.Tensor) -> torch.Tensor:
    """L_depth per image (B,): mean |d - d_gt| (m) over cells with valid depth (finite, > 0); 0 where none.

    depth (B, 1, h, w) predicted; depth_gt (B, h, w) at the same cells, NaN invalid.
    """
    valid = torch.isfinite(depth_gt) & (depth_gt > 0)
    diff = torch.where(valid, (depth[:, 0] - torch.nan_to_num(depth_gt)).abs(), torch.zeros_like(depth_gt))
    return diff.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


def rotation_angle(R_a: torch.Tensor, R_b: torch.Tensor) -> torch.Tensor:
    """Angle (rad) between rotations (B, 3, 3), from the chordal distance ||R_a - R_b||_F = 2 sqrt(2) sin(theta/2).

    Unlike acos((tr - 1) / 2), whose derivative is infinite at 0, this has a bounded gradient near the optimum.
    """
    chord = torch.sqrt((R_a - R_b).square().sum((-1, -2)) + _EPS)
    return 2.0 * torch.asin((chord / (2.0 * math.sqrt(2.0))).clamp(max=1.0 - 1e-7))


def pose_error(R: torch.Tensor, t: torch.Tensor, R_gt: torch.Tensor, t_gt: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) ||t - t_gt|| + beta * angle(R, R_gt); R (B, 3, 3), t (B, 3) T_map_cam; metres (beta in m/rad)."""
    dt = torch.sqrt((t - t_gt).square().sum(-1) + _EPS)
    return dt + beta * rotation_angle(R, R_gt)


def pose_loss(R: torch.Tensor, t: torch.Tensor, T_gt: torch.Tensor, beta: float) -> torch.Tensor:
    """L_pose per image (B,): aligned pose (R, t) against the ground truth T_gt (B, 4, 4)."""
    return pose_error(R, t, T_gt[:, :3, :3], T_gt[:, :3, 3], beta)


def relative_pose(R_i: torch.Tensor, t_i: torch.Tensor, R_j: torch.Tensor, t_j: torch.Tensor):
    """T_i^-1 T_j of two batches of poses T_map_cam -> (R_ij (B, 3, 3), t_ij (B, 3)): camera j in camera i."""
    R_it = R_i.transpose(1, 2)
    return R_it @ R_j, (R_it @ (t_j - t_i)[..., None])[..., 0]


def relative_pose_loss(R_i: torch.Tensor, t_i: torch.Tensor, R_j: torch.Tensor, t_j: torch.Tensor,
                       T_i_j: torch.Tensor, beta: float) -> torch.Tensor:
    """L_rel per edge (B,): predicted T_i^-1 T_j against the measured relative pose T_i_j (B, 4, 4)."""
    R_ij, t_ij = relative_pose(R_i, t_i, R_j, t_j)
    return pose_error(R_ij, t_ij, T_i_j[:, :3, :3], T_i_j[:, :3, 3], beta)
