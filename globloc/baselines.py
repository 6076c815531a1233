"""Baselines measured by the same harness (METHOD.md section 6).

- PoseNetBaseline: direct pose regression, a PoseNet-style head (global average pool -> MLP -> translation and a
  6D rotation, Zhou et al. 2019, which regresses better than a quaternion) on the *same* backbone and trunk as
  GlobLocNet. Saved in the same model-file format with config.extra['arch'] = 'posenet'.
- pnp_pose: GlobLocNet's scene coordinates at the cell centres through cv2.solvePnPRansac instead of the one-shot
  weighted alignment (depth and weight heads unused).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import cv2
import numpy as np
import roma
import torch
from torch import nn

from globloc_ros import frames as fr
from globloc_ros.modelfile import ModelFileError, read_model_dict
from globloc_ros.net import GlobLocNet, NetConfig


class DirectPose(NamedTuple):
    """Output of the direct regression baseline: R (B, 3, 3), t (B, 3) T_map_cam; confident (B,) always True
    (a regressor has no residual to judge itself by)."""
    R: torch.Tensor
    t: torch.Tensor
    confident: torch.Tensor


class DirectPrediction(NamedTuple):
    pose: DirectPose


class PoseNetBaseline(nn.Module):
    """image (B, 3, H, W) RGB 0..255 -> T_map_cam by direct regression. K is accepted and ignored."""

    def __init__(self, config: NetConfig | None = None):
        super().__init__()
        cfg = config or NetConfig()
        self.config = NetConfig.from_dict({**cfg.to_dict(), 'extra': {**cfg.extra, 'arch': 'posenet'}})
        ref = GlobLocNet(self.config)  # the same backbone and trunk, built by the same code
        self.backbone, self.trunk = ref.backbone, ref.trunk
        self.pose_head = nn.Sequential(nn.Linear(self.config.head_width, 256), nn.ReLU(inplace=True),
                                       nn.Linear(256, 9))
        nn.init.zeros_(self.pose_head[2].bias)
        self.pose_head[2].weight.data.mul_(0.1)
        self.register_buffer('mean', ref.mean.clone(), persistent=False)
        self.register_buffer('std', ref.std.clone(), persistent=False)
        self.register_buffer('centre', torch.tensor(self.config.scene_centre), persistent=False)
        # Start at the identity rotation: the 6D output is added to the first two columns of I.
        self.register_buffer('r6_bias', torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), persistent=False)

    def forward(self, image: torch.Tensor, K: torch.Tensor | None = None, solver: str = 'horn') -> DirectPrediction:
        feats = self.trunk(self.backbone((image - self.mean) / self.std))
        out = self.pose_head(feats.mean((2, 3)))
        t = self.centre + self.config.scene_scale * out[:, :3]
        r6 = out[:, 3:] + self.r6_bias
        R = roma.special_gramschmidt(torch.stack([r6[:, :3], r6[:, 3:]], -1))
        return DirectPrediction(DirectPose(R, t, torch.ones(R.shape[0], dtype=torch.bool, device=R.device)))


def build_net(config: NetConfig, arch: str) -> nn.Module:
    if arch == 'globloc':
        return GlobLocNet(config)
    if arch == 'posenet':
        return PoseNetBaseline(config)
    raise ValueError(f"arch must be 'globloc' or 'posenet', got {arch!r}")


def model_arch(config: NetConfig) -> str:
    return config.extra.get('arch', 'globloc')


def load_any_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Model file of either architecture -> (network in eval mode on CPU, meta)."""
    d = read_model_dict(path)
    try:
        cfg = NetConfig.from_dict(d['config'])
        net = build_net(cfg, model_arch(cfg))
        net.load_state_dict(d['state_dict'])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise ModelFileError(f'{path}: weights or config do not fit this network: {e}') from e
    return net.eval(), d['meta']


def pnp_pose(scene_coords: np.ndarray, K: np.ndarray, stride: int, reprojection_px: float = 3.0,
             iterations: int = 256, seed: int = 0) -> tuple[np.ndarray, bool, int]:
    """Pose from scene coordinates by PnP + RANSAC.

    scene_coords (3, h, w) map frame (metres) at the cell centres of the input image; K (3, 3) of that image.
    Returns T_map_cam (4, 4), success flag, inlier count. RANSAC (P3P minimal sets) then an iterative
    refinement on the inliers.
    """
    _, h, w = scene_coords.shape
    uv = fr.cell_centres(h, w, stride).numpy().astype(np.float64)
    X = scene_coords.reshape(3, -1).T.astype(np.float64)
    ok_pts = np.all(np.isfinite(X), 1)
    X, uv = X[ok_pts], uv[ok_pts]
    if len(X) < 6:
        return np.eye(4), False, 0
    cv2.setRNGSeed(seed)
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(X, uv, K.astype(np.float64), None, iterationsCount=iterations,
                                                 reprojectionError=reprojection_px, confidence=0.999,
                                                 flags=cv2.SOLVEPNP_P3P)
    if not ok or inliers is None or len(inliers) < 6:
        return np.eye(4), False, 0 if inliers is None else len(inliers)
    inl = inliers[:, 0]
    rvec, tvec = cv2.solvePnPRefineLM(X[inl], uv[inl], K.astype(np.float64), None, rvec, tvec)
    R_cam_map, _ = cv2.Rodrigues(rvec)
    T_cam_map = fr.pose_matrix(R_cam_map, tvec.reshape(3))
    T = fr.invert_pose(T_cam_map)
    return T, bool(np.all(np.isfinite(T))), int(len(inl))
