"""GlobLocNet: one CNN, three heads (METHOD.md section 2), and the pose from their alignment.

Per cell of a stride-8 map the network predicts
- scene_coords (B, 3, h, w): X_map in metres, as c + sigma * out (c, sigma from the training scene);
- depth (B, 1, h, w): metres, (depth_min + softplus(out) * depth_scale) * fx / depth_focal, clamped to
  depth_max. The head predicts depth for a canonical focal length (depth_focal, input pixels): a longer lens
  (zoom augmentation, another camera) shows the same surface larger, as a closer one would, and fx / depth_focal
  turns the canonical depth back into metres (the canonical camera space of Metric3D);
- weights (B, h*w): softmax over the cells, so they sum to 1.
cam_coords = depth * K^-1 [u, v, 1] at the cell centres (frames.cell_centres), and align_weighted
turns (cam_coords, scene_coords, weights) into T_map_cam.

Two backbones (NetConfig.backbone):
- 'conv': a small conv stack, three stride-2 convs, then residual blocks at stride 8 (dilations from the config);
- 'mobilenet_v2': MobileNetV2's first 14 blocks (Sandler et al. 2018; ImageNet weights via load_imagenet, batch
  norm folded into the convs), their stride-16 output upsampled onto their stride-8 output, one 3x3 conv to
  widths[2].
Normalisation is per sample (GroupNorm, or none in older model files), so single-process and
distributed training stay identical and the exported graph has no batch statistics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from globloc_ros.align import Alignment, align_weighted
from globloc_ros.frames import backproject, cell_centres


@dataclass
class NetConfig:
    """Everything needed to rebuild the network and use it; stored inside the model file."""
    input_size: tuple[int, int] = (320, 240)  # (W, H) the network is fed at
    stride: int = 8
    widths: tuple[int, int, int] = (32, 64, 96)  # stride 2, 4, 8 stages
    head_width: int = 128
    dilations: tuple[int, ...] = (1, 2, 4)  # one residual block per entry, at stride 8
    norm: str = 'none'  # 'none' or 'group' (GroupNorm, 8 groups); files without the key are 'none'
    backbone: str = 'conv'  # 'conv' or 'mobilenet_v2'; files without the key are 'conv'
    mean: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # RGB, on 0..255
    std: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    scene_centre: tuple[float, float, float] = (0.0, 0.0, 0.0)  # c, map frame, metres
    scene_scale: float = 1.0  # sigma, metres
    depth_min: float = 0.1
    depth_scale: float = 1.0
    depth_max: float = 20.0
    depth_focal: float = 0.0  # canonical fx (input pixels) of the depth head; 0: depth ignores K (older files)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'NetConfig':
        d = dict(d)
        for key in ('input_size', 'widths', 'dilations', 'mean', 'std', 'scene_centre'):
            if key not in d:  # files written before the key existed use the default
                continue
            d[key] = tuple(d[key])
        return cls(**d)


class Prediction(NamedTuple):
    """Network output. scene_coords (B, 3, h, w) map frame; depth (B, 1, h, w) m;
    weights (B, h*w) sum to 1; cam_coords (B, h*w, 3) camera frame; pose: Alignment."""
    scene_coords: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor
    cam_coords: torch.Tensor
    pose: Alignment


def _norm(kind: str, width: int) -> nn.Module:
    if kind == 'none':
        return nn.Identity()
    if kind == 'group':
        return nn.GroupNorm(8, width)
    raise ValueError(f"norm must be 'none' or 'group', got {kind!r}")


def _conv(cin: int, cout: int, stride: int = 1, norm: str = 'none') -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), _norm(norm, cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, width: int, dilation: int, norm: str = 'none'):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.norm = _norm(norm, width)
        nn.init.zeros_(self.conv.bias)
        self.conv.weight.data.mul_(0.5)  # keeps the residual sum's scale at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm(self.conv(x)))


# MobileNetV2's inverted-residual stages up to stride 16: (expansion t, channels, blocks, stride of the first).
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))


class _InvertedResidual(nn.Module):
    """1x1 expand (t > 1), 3x3 depthwise with `stride`, 1x1 linear projection; a skip where shapes allow.
    No batch norm: load_imagenet folds it into the convs, a fixed affine per channel, so no batch statistics."""

    def __init__(self, cin: int, cout: int, t: int, stride: int):
        super().__init__()
        hidden = cin * t
        self.expand = nn.Conv2d(cin, hidden, 1) if t != 1 else None
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else F.relu6(self.expand(x))
        y = self.project(F.relu6(self.depthwise(y)))
        return x + y if self.skip else y


class MobileNetV2Backbone(nn.Module):
    """image normalised (B, 3, H, W) -> features (B, width, H/8, W/8): MobileNetV2 to stride 16 (96 channels),
    upsampled and stacked on its stride-8 output (32 channels), fused by a 3x3 conv."""

    def __init__(self, width: int, norm: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2, padding=1)
        blocks, cin = [], 32
        for t, c, n, s in MOBILENET_V2_STAGES:
            for i in range(n):
                blocks.append(_InvertedResidual(cin, c, t, s if i == 0 else 1))
                cin = c
        self.blocks = nn.ModuleList(blocks)
        self.last_stride8 = sum(n for _, _, n, _ in MOBILENET_V2_STAGES[:3]) - 1  # block index
        self.fuse = _conv(32 + cin, width, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.last_stride8:
                s8 = x
        up = F.interpolate(x, size=s8.shape[-2:], mode='bilinear', align_corners=False)
        return self.fuse(torch.cat([s8, up], 1))


def load_imagenet(backbone: MobileNetV2Backbone, state_dict: dict[str, torch.Tensor], eps: float = 1e-5) -> None:
    """Copy torchvision's ImageNet MobileNetV2 weights (`features.*` of mobilenet_v2-b0353104.pth) into
    `backbone`, folding each batch norm (eval statistics) into the conv before it. The fuse conv keeps its own
    initialisation."""
    def fold(conv: nn.Conv2d, prefix_conv: str, prefix_bn: str) -> None:
        try:
            w = state_dict[prefix_conv + '.weight']
            gamma, beta = state_dict[prefix_bn + '.weight'], state_dict[prefix_bn + '.bias']
            mean, var = state_dict[prefix_bn + '.running_mean'], state_dict[prefix_bn + '.running_var']
        except KeyError as e:
            raise ValueError(f'ImageNet weights: missing {e.args[0]}; expected torchvision mobilenet_v2') from None
        if w.shape != conv.weight.shape:
            raise ValueError(f'ImageNet weights: {prefix_conv}.weight is {tuple(w.shape)}, the network needs '
                             f'{tuple(conv.weight.shape)}')
        scale = gamma / torch.sqrt(var + eps)
        with torch.no_grad():
            conv.weight.copy_(w * scale.view(-1, 1, 1, 1))
            conv.bias.copy_(beta - mean * scale)

    fold(backbone.stem, 'features.0.0', 'features.0.1')
    for i, block in enumerate(backbone.blocks, start=1):
        p = f'features.{i}.conv'
        layers = [block.depthwise, block.project] if block.expand is None else \
            [block.expand, block.depthwise, block.project]
        names = [(f'{p}.{j}.0', f'{p}.{j}.1') for j in range(len(layers) - 1)]
        names.append((f'{p}.{len(layers) - 1}', f'{p}.{len(layers)}'))
        for conv, (c, b) in zip(layers, names):
            fold(conv, c, b)


class GlobLocNet(nn.Module):
    def __init__(self, config: NetConfig | None = None):
        super().__init__()
        self.config = cfg = config or NetConfig()
        if cfg.stride != 8:
            raise ValueError(f'only stride 8 is implemented, config says {cfg.stride}')
        w2, w4, w8 = cfg.widths
        if cfg.backbone == 'conv':
            self.backbone = nn.Sequential(
                _conv(3, w2, 2, cfg.norm), _conv(w2, w4, 2, cfg.norm), _conv(w4, w8, 2, cfg.norm),
                *(_Residual(w8, d, cfg.norm) for d in cfg.dilations))
        elif cfg.backbone == 'mobilenet_v2':
            self.backbone = MobileNetV2Backbone(w8, cfg.norm)
        else:
            raise ValueError(f"backbone must be 'conv' or 'mobilenet_v2', got {cfg.backbone!r}")
        self.trunk = nn.Sequential(nn.Conv2d(w8, cfg.head_width, 1), nn.ReLU(inplace=True))
        self.scene_head = nn.Conv2d(cfg.head_width, 3, 1)
        self.depth_head = nn.Conv2d(cfg.head_width, 1, 1)
        self.weight_head = nn.Conv2d(cfg.head_width, 1, 1)
        for head in (self.scene_head, self.depth_head, self.weight_head):
            nn.init.zeros_(head.bias)
            head.weight.data.mul_(0.1)
        self.register_buffer('mean', torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('centre', torch.tensor(cfg.scene_centre).view(1, 3, 1, 1), persistent=False)

    def heads(self, image: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
        """image (B, 3, H, W) RGB on 0..255, K (B, 3, 3) of that image -> features (B, C, h, w),
        scene_coords (B, 3, h, w), depth (B, 1, h, w) metres, weight logits (B, h*w)."""
        cfg = self.config
        feats = self.trunk(self.backbone((image - self.mean) / self.std))
        scene = self.centre + cfg.scene_scale * self.scene_head(feats)
        depth = cfg.depth_min + F.softplus(self.depth_head(feats)) * cfg.depth_scale
        if cfg.depth_focal > 0:
            depth = depth * (K[:, :1, :1, None] / cfg.depth_focal)
        depth = depth.clamp(max=cfg.depth_max)
        return feats, scene, depth, self.weight_head(feats).flatten(1)

    def forward(self, image: torch.Tensor, K: torch.Tensor, solver: str = 'horn',
                measured_depth: torch.Tensor | None = None) -> Prediction:
        """image (B, 3, H, W) RGB on 0..255, K (B, 3, 3) of that image -> Prediction (pose T_map_cam).
        measured_depth (B, 1, h, w) metres at the cells, optional: see with_measured_depth."""
        _, scene, depth, logits = self.heads(image, K)
        B, _, h, w = scene.shape
        weights = torch.softmax(logits, dim=1)
        uv = cell_centres(h, w, self.config.stride, device=image.device, dtype=image.dtype)
        cam = backproject(with_measured_depth(depth, measured_depth).flatten(1), uv, K)
        map_pts = scene.flatten(2).transpose(1, 2)
        return Prediction(scene, depth, weights, cam, align_weighted(cam, map_pts, weights, solver))


def with_measured_depth(depth: torch.Tensor, measured: torch.Tensor | None) -> torch.Tensor:
    """The depth head's depth (B, 1, h, w) with a measured depth in its place (RGB-D cameras).

    measured (B, 1, h, w): metres at the cell centres (frames.depth_at_cells), 0 (or NaN) where nothing was
    measured; those cells keep the head's depth. None: the head's depth everywhere.
    """
    if measured is None:
        return depth
    return torch.where(measured > 0, measured, depth)


class PoseGraph(nn.Module):
    """The deployable graph: image (B, 3, H, W) 0..255 RGB + K (B, 3, 3) + depth (B, 1, h, w) metres at the
    cells (0: not measured, use the depth head; see with_measured_depth) -> T_map_cam (B, 4, 4),
    residual (B,), n_eff (B,), spread (B,). Network, cam coords and Horn alignment in one graph,
    so ONNX / TensorRT run all of it."""

    def __init__(self, net: GlobLocNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, K: torch.Tensor, depth: torch.Tensor):
        pose = self.net(image, K, measured_depth=depth).pose
        bottom = torch.zeros_like(pose.t[:, None, :]).expand(-1, 1, 3)
        last = torch.cat([pose.t[:, :, None], torch.ones_like(pose.t[:, :1, None])], 1)
        T = torch.cat([torch.cat([pose.R, bottom], 1), last], 2)
        return T, pose.residual, pose.n_eff, pose.spread


def count_macs(net: GlobLocNet, width: int, height: int) -> int:
    """Multiply-accumulates of the conv layers for one (W, H) image."""
    macs = 0

    def hook(module, _inputs, output):
        nonlocal macs
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs += output.numel() * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net.heads(torch.zeros(1, 3, height, width), torch.eye(3)[None])
    for h in handles:
        h.remove()
    return macs
