"""`globloc eval`: run a model over posed frames, score it (METHOD.md section 6), write JSON and plots.

    globloc eval --model models/globloc_synth.pt --bags data/scene/seq_02 --json out/eval.json --plots out/plots

Every frame is localised on its own (batch 1, as at run time), and timed from the recorded image to the pose
(resize + network + alignment). A frame whose pose is not confident or not finite is a failure: it stays in the
statistics at infinite error (so it lowers the recalls and can raise the medians), never dropped.

Backends: 'torch' (default), 'onnxruntime', 'auto' run globloc_ros.runtime.Localizer, the node's own backend and
confidence gate, so the figures are what the node would publish; 'direct' runs the network here with torch (align's
flag plus the runtime's gate). The direct-regression baseline and the PnP method always run direct
(the Localizer runs only the one-shot alignment graph). Methods: 'align' (the model's own pose; the regression
baseline's output for a posenet model) or 'pnp' (the scene coordinates through cv2.solvePnPRansac).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from globloc import baselines as bl
from globloc import bags as bg
from globloc import dataset as ds
from globloc_ros import frames as fr
from globloc_ros.modelfile import read_model_dict
from globloc_ros.net import NetConfig
from globloc_ros.placemap import load_map
from globloc_ros.runtime import MAX_RESIDUAL_M, MIN_EFFECTIVE_POINTS, PATHS, Localizer, gate, pose_from_heads

RECALLS = ((0.05, 5.0), (0.10, 10.0), (0.25, 2.0))  # (metres, degrees)
WRONG = (0.25, 10.0)  # a published pose at least this far off (metres or degrees) is a wrong one
# --sequential: the last published pose as the next frame's prior, 10 cm and 5 deg std (a robot's motion between
# frames, no odometry in a bag)
SEQUENTIAL_PRIOR_COVARIANCE = np.diag([0.1 ** 2] * 3 + [np.radians(5.0) ** 2] * 3)
DISTANCE_BINS_M = (0.0, 0.1, 0.25, 0.5, 1.0, np.inf)  # recall against the distance to the nearest map camera
ANGLE_BINS_DEG = (0.0, 10.0, 20.0, 30.0, 45.0, 60.0, 180.0)  # ... and against the angle to that camera


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', required=True,
                   help='model file (.pt; --backend onnxruntime converts it as the node does)')
    p.add_argument('--bags', nargs='+', required=True, help='test bags (folders/files or a folder of bag folders)')
    p.add_argument('--split', default='all', help="'all' or 'every:K' (every K-th frame of each bag)")
    p.add_argument('--json', default=None, help='write the report here')
    p.add_argument('--plots', default=None, help='write PNG plots into this folder')
    p.add_argument('--backend', default='torch', choices=('torch', 'onnxruntime', 'auto', 'direct'),
                   help="Localizer backend (default torch), or 'direct' (this module's own torch loop)")
    p.add_argument('--method', choices=('align', 'pnp'), default='align',
                   help="'align': the model's pose; 'pnp': its scene coordinates through cv2.solvePnPRansac")
    p.add_argument('--depth', action='store_true',
                   help="RGB-D: give the Localizer each frame's recorded depth, which replaces the depth head's")
    p.add_argument('--map', default=None, metavar='MAP',
                   help='refine each confident pose against this map (`globloc map`): ICP with --depth, else '
                        'image features')
    p.add_argument('--sequential', action='store_true',
                   help="with --map: each bag as a stream, the last published pose the next frame's prior (as the "
                        'node does); default: every frame on its own (single-image relocalization)')
    p.add_argument('--max-frames', type=int, default=None, help='first N frames of each bag')
    bg.add_topic_argument(p)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')


def stream_test_frames(bags, split: str = 'all', max_frames: int | None = None,
                       topics: bg.Topics = bg.Topics()) -> Iterator[bg.Frame]:
    """The test frames of bags (split 'all' or 'every:K'; the first max_frames of each bag), one at a time."""
    every = ds.parse_split(split)
    for i, p in enumerate(bg.bag_paths(bags)):
        yield from (f for f in bg.iter_frames(p, seq=i, topics=topics, max_frames=max_frames, progress=False)
                    if f.index % every == 0)


def load_test_frames(bags, split: str = 'all', max_frames: int | None = None,
                     topics: bg.Topics = bg.Topics()) -> list[bg.Frame]:
    """stream_test_frames as a list (a few frames, used several times: compare, tests)."""
    return list(stream_test_frames(bags, split, max_frames, topics))


class TestFrames(Sequence):
    """Test frames that are never all in memory (what `globloc eval` scores): the items are the frames without
    their pixels (image, depth and landmarks None; pose, stamp and ids kept), from one pass over the bags;
    `stream()` reads the bags again and yields the same frames with their pixels. size: (W, H) of the first
    frame; without_depth: how many have no recorded depth."""
    __test__ = False  # not a pytest class

    def __init__(self, bags, split: str = 'all', max_frames: int | None = None, topics: bg.Topics = bg.Topics()):
        self._args = (bags, split, max_frames, topics)
        self.size: tuple[int, int] | None = None
        self.without_depth = 0
        self._light: list[bg.Frame] = []
        for f in self.stream():
            self.size = self.size or (f.image.shape[1], f.image.shape[0])
            self.without_depth += f.depth is None
            self._light.append(dataclasses.replace(f, image=None, depth=None, landmarks=None))

    def stream(self) -> Iterator[bg.Frame]:
        return stream_test_frames(*self._args)

    def __len__(self) -> int:
        return len(self._light)

    def __getitem__(self, k):
        return self._light[k]


def with_pixels(frames: Sequence[bg.Frame]) -> Iterable[bg.Frame]:
    """The frames with their images and depth: TestFrames read again from the bags, a list as it is."""
    return frames.stream() if isinstance(frames, TestFrames) else frames


def recorded_size(frames: Sequence[bg.Frame]) -> tuple[int, int]:
    """(W, H) of the first frame."""
    return frames.size if isinstance(frames, TestFrames) else frames[0].image.shape[1::-1]


class _DirectLocalizer:
    """Torch in this process: image (H, W, 3) uint8 RGB + K -> (T_map_cam (4, 4), confident, extras)."""

    def __init__(self, model_path, method: str):
        self.net, self.meta = bl.load_any_model(model_path)
        self.config = self.net.config
        self.arch = bl.model_arch(self.config)
        self.method = method
        if method == 'pnp' and self.arch != 'globloc':
            raise ValueError(f'--method pnp needs a scene-coordinate (globloc) model; {model_path} is {self.arch}')

    def __call__(self, image: np.ndarray, K: np.ndarray):
        img, K_in, _, _ = ds.resize_frame(image, K, self.config.input_size)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        Kt = torch.from_numpy(K_in).float()[None]
        with torch.inference_mode():
            if self.method == 'pnp':
                _, scene, _, _ = self.net.heads(x, Kt)
                T, ok, inliers = bl.pnp_pose(scene[0].numpy(), K_in, self.config.stride)
                return T, ok, {'inliers': inliers}
            pose = self.net(x, Kt).pose
        T = fr.pose_matrix(pose.R[0].double().numpy(), pose.t[0].double().numpy())
        if not hasattr(pose, 'residual'):  # direct regression: nothing to gate on
            return T, bool(pose.confident[0]), {}
        residual, n_eff, spread = float(pose.residual[0]), float(pose.n_eff[0]), float(pose.spread[0])
        # The node's own rule, so 'direct' and the Localizer agree.
        ok = bool(pose.confident[0]) and gate(T, residual, n_eff, spread, MAX_RESIDUAL_M, MIN_EFFECTIVE_POINTS)[0]
        return T, ok, {'residual_m': residual, 'n_eff': n_eff}


class _RuntimeLocalizer:
    """globloc_ros.runtime.Localizer (the node's backend), on the CPU in fp32 (what the report states), also
    where a GPU is present."""

    def __init__(self, model_path, backend: str, place_map=None):
        self.loc = Localizer(model_path, backend=backend, device='cpu', place_map=place_map)
        self.meta = {}
        self.prior = None  # --sequential: (T_map_cam, covariance) of the last published pose

    def __call__(self, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None = None):
        r = self.loc.localize(image, K, depth, prior=self.prior)
        extra = {'residual_m': float(r.residual), 'n_eff': float(r.n_eff), 'path': r.path,
                 'T_one_shot': np.asarray(r.T_one_shot).tolist(),
                 'position_covariance': np.asarray(r.covariance)[:3, :3].tolist()}
        if depth is not None:
            extra['measured_depth'] = r.measured_depth
        if not r.confident:
            extra['reason'] = r.reason
        if r.refinement is not None:
            extra['refined'] = r.path in ('refined', 'tracked', 'recovered')
            extra['refine_inliers'] = r.refinement.inlier_fraction
            if not r.refinement.accepted:
                extra['refine_reason'] = r.refinement.reason
        return np.asarray(r.T_map_cam, np.float64), bool(r.confident), extra


def localize_frames(model_path, frames: Sequence[bg.Frame], backend: str = 'torch', method: str = 'align',
                    warmup: int = 3, depth: bool = False, place_map=None, sequential: bool = False):
    """Localise each frame (depth: with its recorded depth, RGB-D; place_map: refined against that map file).
    sequential: as the node does on a stream, the last published pose of the same sequence is the next frame's
    prior (no odometry in a bag: the pose itself); otherwise every frame is localised on its own.
    Returns T_est (N, 4, 4), ok (N,) bool, time_ms (N,), extras (list of dicts), meta, and the backend actually
    used ('direct' for posenet models and for PnP)."""
    arch = bl.model_arch(NetConfig.from_dict(read_model_dict(model_path)['config']))
    if backend != 'direct' and (arch != 'globloc' or method == 'pnp'):
        backend = 'direct'
    if backend == 'direct' and (depth or place_map is not None):
        raise ValueError(f"{'--depth' if depth else '--map'} needs a scene-coordinate model run by the Localizer "
                         f'(--backend torch, onnxruntime or auto, --method align); got a {arch} model, backend '
                         f'{backend}, method {method}')
    missing = frames.without_depth if isinstance(frames, TestFrames) else sum(f.depth is None for f in frames)
    if depth and missing:
        raise ValueError(f'--depth: {missing} of {len(frames)} test frames have no recorded depth')
    loc = (_DirectLocalizer(model_path, method) if backend == 'direct'
           else _RuntimeLocalizer(model_path, backend, place_map))
    args = (lambda f: (f.image, f.K, f.depth)) if depth else (lambda f: (f.image, f.K))
    stream = iter(with_pixels(frames))
    first = list(itertools.islice(stream, warmup))
    for f in first:  # first calls allocate; keep them out of the timing
        loc(*args(f))
    T_est = np.zeros((len(frames), 4, 4))
    ok = np.zeros(len(frames), bool)
    times = np.zeros(len(frames))
    extras = []
    if sequential and backend == 'direct':
        raise ValueError('--sequential needs the Localizer (--backend torch, onnxruntime or auto)')
    previous_seq = None
    for k, f in enumerate(itertools.chain(first, stream)):
        if backend != 'direct':
            loc.prior = None if not sequential or k == 0 or previous_seq != f.seq or not ok[k - 1] \
                else (T_est[k - 1], SEQUENTIAL_PRIOR_COVARIANCE)
        previous_seq = f.seq
        t0 = time.perf_counter()
        T, conf, extra = loc(*args(f))
        times[k] = (time.perf_counter() - t0) * 1e3
        T_est[k], ok[k] = T, conf and bool(np.all(np.isfinite(T)))
        extras.append(extra)
    meta = loc.meta if backend == 'direct' else read_model_dict(model_path)['meta']
    return T_est, ok, times, extras, meta, backend


def head_errors(model_path, frames: Sequence[bg.Frame]) -> dict | None:
    """Where a scene-coordinate model's pose error comes from, on frames with recorded depth (None otherwise, and
    for regression models): medians over frames of the per-cell |depth - recorded depth| (m) and
    ||scene coordinate - recorded point|| (m, the recorded depth back-projected with the ground-truth pose), and
    the median pose error when the recorded depth replaces the depth head in the same weighted alignment (what
    the depth head costs; the recorded depth sampled at the cells as the Localizer samples a depth image,
    frames.measured_depth_at_cells, and cells without it keep the head's)."""
    net, _ = bl.load_any_model(model_path)
    if bl.model_arch(net.config) != 'globloc':
        return None
    stride, depth_err, scene_err, T_rec, T_gt = net.config.stride, [], [], [], []
    for f in with_pixels(frames):
        if f.depth is None:
            continue
        img, K, sx, sy = ds.resize_frame(f.image, f.K, net.config.input_size)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        Kt = torch.from_numpy(K).float()[None]
        with torch.inference_mode():
            _, scene, depth, logits = net.heads(x, Kt)
        h, w = scene.shape[2:]
        d_rec = torch.from_numpy(fr.measured_depth_at_cells(f.depth, sx, sy, h, w, stride)).float().reshape(1, -1)
        valid = torch.isfinite(d_rec[0])
        if valid.sum() < 10:
            continue
        cam_rec = fr.backproject(d_rec, fr.cell_centres(h, w, stride), Kt)[0]  # (N, 3), NaN where no depth
        R, t = (torch.from_numpy(a).float() for a in (f.T_map_cam[:3, :3], f.T_map_cam[:3, 3]))
        depth_err.append(float((depth.flatten(1)[0] - d_rec[0])[valid].abs().median()))
        scene_err.append(float((scene[0].flatten(1).T - (cam_rec @ R.T + t))[valid].norm(dim=1).median()))
        # The runtime's own alignment, fed the recorded depth (NaN = none: the head's depth there).
        T_rec.append(pose_from_heads(net, scene, depth, logits, Kt, d_rec.view(1, 1, h, w))[0][0].double().numpy())
        T_gt.append(f.T_map_cam)
    if not T_rec:
        return None
    t_err, r_err = fr.pose_errors(np.stack(T_rec), np.stack(T_gt))
    return {'frames': len(T_rec), 'median_depth_error_m': float(np.median(depth_err)),
            'median_scene_coord_error_m': float(np.median(scene_err)),
            'with_recorded_depth': {'median_translation_m': float(np.median(t_err)),
                                    'median_rotation_deg': float(np.median(r_err))}}


def pose_metrics(T_est: np.ndarray, T_gt: np.ndarray, ok: np.ndarray) -> dict:
    """Errors and summary. Failures (ok False) count at infinite error. T_* (N, 4, 4) T_map_cam."""
    t_raw, r_raw = fr.pose_errors(T_est, T_gt)
    t_err, r_err = t_raw, r_raw
    bad = ~ok | ~np.isfinite(t_err) | ~np.isfinite(r_err)
    t_err = np.where(bad, np.inf, t_err)
    r_err = np.where(bad, np.inf, r_err)
    n = len(t_err)
    out = {'frames': int(n), 'failures': int(bad.sum()),
           'median_translation_m': float(np.median(t_err)) if n else math.nan,
           'median_rotation_deg': float(np.median(r_err)) if n else math.nan,
           'mean_translation_m_ok': float(t_err[~bad].mean()) if (~bad).any() else math.nan,
           'p90_translation_m': float(np.quantile(t_err, 0.9, method='higher')) if n else math.nan}
    fin = np.isfinite(t_raw) & np.isfinite(r_raw)
    # The estimates' own accuracy, confidence ignored (diagnostics only: the figures above are the measure).
    out['ungated'] = {'median_translation_m': float(np.median(t_raw[fin])) if fin.any() else math.nan,
                      'median_rotation_deg': float(np.median(r_raw[fin])) if fin.any() else math.nan,
                      'non_finite': int((~fin).sum())}
    for m, d in RECALLS:
        key = f'recall_{round(m * 100)}cm_{d:g}deg'
        out[key] = float(np.mean((t_err <= m) & (r_err <= d))) if n else 0.0
    return out, t_err, r_err, t_raw, r_raw


def evaluate(model_path, bags, split: str = 'all', backend: str = 'torch', method: str = 'align',
             json_path=None, plots_dir=None, max_frames: int | None = None, frames: list | None = None,
             topics: bg.Topics = bg.Topics(), depth: bool = False, place_map=None, sequential: bool = False) -> dict:
    """Evaluate a model file on bags (or on already-read `frames`); returns the report dict (see module doc).
    depth: RGB-D, the Localizer gets each frame's recorded depth; place_map: a map file to refine against."""
    frames = frames if frames is not None else TestFrames(bags, split, max_frames, topics)
    if not frames:
        raise ValueError(f'no test frames in {bags} (split {split})')
    T_gt = np.stack([f.T_map_cam for f in frames])
    T_est, ok, times, extras, meta, backend = localize_frames(model_path, frames, backend, method, depth=depth,
                                                              place_map=place_map, sequential=sequential)
    summary, t_err, r_err, t_raw, r_raw = pose_metrics(T_est, T_gt, ok)
    seen = frames_seen_in_training(meta, bags, frames)
    if seen:
        warnings.warn(f'{seen} of the {len(frames)} test frames were training frames of {model_path} (same bag, not '
                      f'left out by its --holdout): these figures are not held-out accuracy')
    w, h = recorded_size(frames)
    report = {
        'model': str(model_path), 'bags': [str(b) for b in (bags or [])], 'split': split,
        'backend': backend, 'method': method, 'depth_input': depth, 'place_map': place_map and str(place_map),
        'refined_fraction': float(np.mean([e.get('refined', False) for e in extras])),
        'device': 'cpu', 'threads': torch.get_num_threads(),
        'precision': 'fp32', 'recorded_size': [w, h],
        'input_size': list(meta.get('recipe', {}).get('input_size', [])) or None,
        'model_command': meta.get('command'), 'model_steps': meta.get('steps'), 'frames_seen_in_training': seen,
        **summary,
        'heads': head_errors(model_path, frames) if method == 'align' else None,
        'time_ms_per_frame': {'mean': float(times.mean()), 'p50': float(np.percentile(times, 50)),
                              'p99': float(np.percentile(times, 99))},
        'per_frame': [{'seq': f.seq, 'index': f.index, 'stamp_ns': f.stamp_ns,
                       'translation_error_m': _finite(t), 'rotation_error_deg': _finite(r), 'confident': bool(o),
                       'ungated_translation_error_m': _finite(tr), 'ungated_rotation_error_deg': _finite(rr),
                       'time_ms': round(float(ms), 3), **extra}
                      for f, t, r, tr, rr, o, ms, extra in zip(frames, t_err, r_err, t_raw, r_raw, ok, times, extras)],
    }
    if backend != 'direct':
        report.update(trust_metrics(t_raw, r_raw, ok, T_est, T_gt, extras))
        report['gate_calibration'] = gate_calibration(frames, extras)
    if place_map is not None:
        cov = coverage(load_map(place_map), frames, t_err, r_err, extras)
        report['coverage_by_distance'], report['coverage_by_angle'] = cov['by_distance'], cov['by_angle']
    if plots_dir:
        report['plots'] = [str(p) for p in plot_results(T_gt, T_est, plots_dir, ok=ok,
                                                        title=f'{Path(model_path).name} ({method})').values()]
        report['plots'] += [str(p) for p in plot_trust(report, T_est, T_gt, ok, extras, plots_dir)]
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_jsonable(report), indent=1))
    return report


def sigma_along_error(T_est: np.ndarray, T_gt: np.ndarray, extras: list[dict]) -> np.ndarray:
    """(N,) the published position std (m) in the direction of each frame's position error (NaN without one)."""
    out = np.full(len(T_est), np.nan)
    for k, e in enumerate(extras):
        if 'position_covariance' in e:
            d = T_est[k, :3, 3] - T_gt[k, :3, 3]
            n = np.linalg.norm(d)
            u = d / n if n > 0 else np.array([1.0, 0.0, 0.0])
            out[k] = np.sqrt(max(float(u @ np.asarray(e['position_covariance']) @ u), 0.0))
    return out


def trust_metrics(t_raw: np.ndarray, r_raw: np.ndarray, ok: np.ndarray, T_est: np.ndarray, T_gt: np.ndarray,
                  extras: list[dict]) -> dict:
    """Frames per path with the rejection reasons, wrong published poses (>= WRONG) and whether the published
    covariance is consistent with the error (share of published positions within 3 std along their error)."""
    paths = Counter(e.get('path', 'one-shot') for e in extras)
    reasons = Counter(re.sub(r'-?\d+(\.\d+)?', 'N', e['reason']) for e in extras if 'reason' in e)
    wrong = ok & ((t_raw >= WRONG[0]) | (r_raw >= WRONG[1]))
    sigma = sigma_along_error(T_est, T_gt, extras)
    within = t_raw[ok] <= 3 * sigma[ok]
    return {'paths': {p: paths.get(p, 0) for p in PATHS if paths.get(p)},
            'rejection_reasons': dict(reasons.most_common(5)),
            'published': int(ok.sum()), 'published_wrong': int(wrong.sum()),
            'published_wrong_fraction': float(wrong.sum() / max(ok.sum(), 1)),
            'within_3_sigma': float(within.mean()) if len(within) else math.nan}


def one_shot_errors(frames: Sequence[bg.Frame], extras: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) translation (m) and rotation (deg) errors of each frame's one-shot pose (extras' T_one_shot; NaN for
    a frame without one), whatever the gate and the map then did."""
    shot = np.array([e['T_one_shot'] if 'T_one_shot' in e else np.full((4, 4), np.nan) for e in extras], np.float64)
    return fr.pose_errors(shot, np.stack([f.T_map_cam for f in frames]))


def gate_calibration(frames: Sequence[bg.Frame], extras: list[dict], max_wrong: float = 0.01) -> dict | None:
    """The one-shot gate these frames call for: the largest max_residual_m at which at most `max_wrong` of the
    one-shot poses it lets through are wrong (>= WRONG off), with how many it lets through and how many of them
    are within 10 cm / 10 deg. Computed from every frame's one-shot pose and alignment residual, whatever the gate
    and the map did; None without them (other methods). A threshold for the node's `max_residual_m` where it runs
    without a map, read off a recorded pass the model did not train on."""
    if not extras or any('residual_m' not in e or 'T_one_shot' not in e for e in extras):
        return None
    residual = np.array([e['residual_m'] for e in extras], np.float64)
    t, r = one_shot_errors(frames, extras)
    order = np.argsort(np.nan_to_num(residual, nan=np.inf), kind='stable')
    wrong = ~((t < WRONG[0]) & (r < WRONG[1]))[order]  # NaN poses count as wrong
    good = ((t <= 0.1) & (r <= 10))[order]
    n = np.arange(1, len(order) + 1)
    ok = (np.cumsum(wrong) <= max_wrong * n) & np.isfinite(residual[order])
    if not ok.any():
        return {'max_residual_m': 0.0, 'published': 0, 'recall_10cm_10deg': 0.0, 'max_wrong': max_wrong}
    k = int(np.flatnonzero(ok).max())
    return {'max_residual_m': float(residual[order][k]), 'published': k + 1,
            'recall_10cm_10deg': float(good[:k + 1].sum() / len(order)), 'max_wrong': max_wrong}


def coverage(place, frames: list[bg.Frame], t_err: np.ndarray, r_err: np.ndarray,
             extras: list[dict]) -> dict[str, list[dict]]:
    """Recall at 10 cm / 10 deg of the published poses and of the one-shot poses (confidence ignored) against how
    far each frame's camera is from the map's cameras (its keyframes: a recorded camera every
    placemap.KEYFRAME_STEP): 'by_distance' bins the distance to the nearest keyframe (DISTANCE_BINS_M), with the
    median angle to that keyframe; 'by_angle' bins that angle (ANGLE_BINS_DEG), with the median distance.
    Empty lists for a map without keyframes."""
    if not len(place.keyframe_poses):
        return {'by_distance': [], 'by_angle': []}
    C = place.keyframe_poses[:, :3, 3].astype(np.float64)
    dist, angle = np.zeros(len(frames)), np.zeros(len(frames))
    for k, f in enumerate(frames):
        d = np.linalg.norm(C - f.T_map_cam[:3, 3], axis=1)
        j = int(np.argmin(d))
        dist[k], angle[k] = d[j], fr.rotation_error_deg(place.keyframe_poses[j, :3, :3], f.T_map_cam[:3, :3])
    t1, r1 = one_shot_errors(frames, extras)
    hit, hit1 = (t_err <= 0.1) & (r_err <= 10), (t1 <= 0.1) & (r1 <= 10)

    def rows(value, bins, other, other_key):
        out = []
        for lo, hi in zip(bins[:-1], bins[1:]):
            b = (value >= lo) & (value < hi)
            if b.any():
                out.append({'from': lo, 'to': _finite(hi), 'frames': int(b.sum()),
                            other_key: float(np.median(other[b])), 'recall_10cm_10deg': float(hit[b].mean()),
                            'one_shot_recall_10cm_10deg': float(hit1[b].mean())})
        return out
    return {'by_distance': rows(dist, DISTANCE_BINS_M, angle, 'median_angle_deg'),
            'by_angle': rows(angle, ANGLE_BINS_DEG, dist, 'median_distance_m')}


def frames_seen_in_training(meta: dict, bags, frames: list[bg.Frame]) -> int:
    """How many of `frames` (read from `bags`, frame.seq = position in bags) the model trained on: frames of its
    training bags (meta data.bags) that its --holdout and --max-frames did not leave out."""
    trained = {Path(b).resolve() for b in meta.get('data', {}).get('bags', [])}
    if not trained or not bags:
        return 0
    recipe = meta.get('recipe', {})
    every = ds.parse_split(recipe['holdout']) if recipe.get('holdout') else 0
    max_frames = recipe.get('max_frames') or math.inf
    paths = [p.resolve() for p in bg.bag_paths(bags)]
    return sum(paths[f.seq] in trained and f.index < max_frames and not (every and f.index % every == 0)
               for f in frames)


def _finite(x: float):
    return float(x) if math.isfinite(x) else None


def _jsonable(x):
    """inf / NaN -> None (strict JSON has no Infinity)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def plot_results(T_gt: np.ndarray, T_est: np.ndarray, out_dir, ok: np.ndarray | None = None, title: str = '',
                 prefix: str = '') -> dict[str, Path]:
    """PNG plots of estimated vs ground-truth poses T_map_cam (N, 4, 4), in frame order.

    trajectory: top view on the two map axes of largest camera-centre spread (x-y for a ground robot);
    error_cdf: cumulative distribution of translation (cm) and rotation (deg) errors, failures at infinity;
    error_over_index: both errors per frame. ok (N,) marks confident poses (default: all finite ones).
    Returns {name: path}.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T_gt, T_est = np.asarray(T_gt, np.float64), np.asarray(T_est, np.float64)
    n = len(T_gt)
    ok = np.all(np.isfinite(T_est.reshape(n, -1)), 1) if ok is None else np.asarray(ok, bool)
    t_err, r_err = fr.pose_errors(np.where(ok[:, None, None], T_est, np.eye(4)), T_gt)
    t_err = np.where(ok, t_err, np.inf)
    r_err = np.where(ok, r_err, np.inf)
    paths = {}

    c_gt, c_est = T_gt[:, :3, 3], T_est[:, :3, 3]
    spread = c_gt.std(0)
    ax_i, ax_j = sorted(np.argsort(spread)[::-1][:2]) if spread[2] > min(spread[0], spread[1]) else (0, 1)
    names = 'xyz'
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.plot(c_gt[:, ax_i], c_gt[:, ax_j], '-', color='black', lw=1.5, label='ground truth')
    ax.plot(c_est[ok, ax_i], c_est[ok, ax_j], '.', color='tab:blue', ms=3, label='estimate')
    for k in np.flatnonzero(ok)[::max(1, n // 60)]:  # error vectors, thinned
        ax.plot([c_gt[k, ax_i], c_est[k, ax_i]], [c_gt[k, ax_j], c_est[k, ax_j]], '-', color='tab:red', lw=0.6)
    if (~ok).any():
        ax.plot(c_gt[~ok, ax_i], c_gt[~ok, ax_j], 'x', color='tab:red', ms=5, label=f'failure ({(~ok).sum()})')
    ax.set_xlabel(f'{names[ax_i]} (m)')
    ax.set_ylabel(f'{names[ax_j]} (m)')
    ax.set_aspect('equal', adjustable='datalim')
    ax.legend(loc='best', fontsize=8)
    ax.set_title(f'{title} top view'.strip())
    paths['trajectory'] = _save(fig, out_dir / f'{prefix}trajectory.png')

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, err, unit, scale in ((axes[0], t_err, 'translation error (cm)', 100.0),
                                 (axes[1], r_err, 'rotation error (deg)', 1.0)):
        finite = np.sort(err[np.isfinite(err)]) * scale
        ax.step(finite, np.arange(1, len(finite) + 1) / max(n, 1), where='post')
        ax.set_xscale('log' if len(finite) and finite.max() > 20 * max(np.median(finite), 1e-9) else 'linear')
        ax.set_xlabel(unit)
        ax.set_ylabel('fraction of frames')
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.suptitle(f'{title} error CDF ({n} frames, {(~ok).sum()} failures)'.strip())
    paths['error_cdf'] = _save(fig, out_dir / f'{prefix}error_cdf.png')

    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    idx = np.arange(n)
    axes[0].plot(idx, np.where(ok, t_err * 100, np.nan), lw=0.8)
    axes[0].set_ylabel('translation (cm)')
    axes[1].plot(idx, np.where(ok, r_err, np.nan), lw=0.8, color='tab:orange')
    axes[1].set_ylabel('rotation (deg)')
    axes[1].set_xlabel('frame')
    for ax in axes:
        ax.grid(alpha=0.3)
        for k in np.flatnonzero(~ok):
            ax.axvline(k, color='tab:red', alpha=0.3, lw=0.8)
    fig.suptitle(f'{title} error over frames'.strip())
    paths['error_over_index'] = _save(fig, out_dir / f'{prefix}error_over_index.png')
    return paths


def plot_trust(report: dict, T_est: np.ndarray, T_gt: np.ndarray, ok: np.ndarray, extras: list[dict],
               out_dir) -> list[Path]:
    """error_vs_sigma.png: each published position's error against its predicted std (along the error), with
    the 1 and 3 sigma lines; recall_vs_distance.png (with a map): recall against the distance from and the angle to
    the map's cameras, published and one-shot."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    paths = []
    sigma = sigma_along_error(T_est, T_gt, extras)
    pub = ok & np.isfinite(sigma)
    if pub.any():
        err = np.linalg.norm(T_est[:, :3, 3] - T_gt[:, :3, 3], axis=1)
        fig, ax = plt.subplots(figsize=(6, 5))
        for path in PATHS:
            m = pub & np.array([e.get('path') == path for e in extras])
            if m.any():
                ax.scatter(sigma[m] * 100, err[m] * 100, s=10, label=f'{path} ({m.sum()})')
        lim = np.array([max(min(sigma[pub].min(), err[pub].min()) * 100, 1e-3), max(sigma[pub].max() * 300,
                                                                                  err[pub].max() * 100)])
        ax.plot(lim, lim, 'k:', lw=1, label='1 sigma')
        ax.plot(lim, 3 * lim, 'k--', lw=1, label='3 sigma')
        ax.set(xscale='log', yscale='log', xlabel='predicted position std along the error (cm)',
               ylabel='position error (cm)',
               title=f"published poses: {report['within_3_sigma']:.0%} within 3 sigma, "
                     f"{report['published_wrong']} wrong (>= {WRONG[0] * 100:g} cm or {WRONG[1]:g} deg)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / 'error_vs_sigma.png'))
    panels = [(report.get('coverage_by_distance') or [], 'm', 'distance from the nearest map camera'),
              (report.get('coverage_by_angle') or [], 'deg', 'angle to the nearest map camera')]
    if panels[0][0]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (rows, unit, what) in zip(axes, panels):
            labels = [f"{r['from']:g}-{r['to']:g} {unit}\n({r['frames']})" if r['to'] else
                      f"> {r['from']:g} {unit}\n({r['frames']})" for r in rows]
            x = np.arange(len(rows))
            ax.bar(x - 0.2, [r['one_shot_recall_10cm_10deg'] * 100 for r in rows], 0.4, label='one-shot')
            ax.bar(x + 0.2, [r['recall_10cm_10deg'] * 100 for r in rows], 0.4, label='published')
            ax.set_xticks(x, labels, fontsize=8)
            ax.set(ylabel='recall at 10 cm / 10 deg (%)', xlabel=f'{what} (frames)', ylim=(0, 118),
                   yticks=range(0, 101, 20))
            ax.legend(loc='upper center', ncol=2)
        paths.append(_save(fig, out_dir / 'recall_vs_distance.png'))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def format_summary(r: dict) -> str:
    t = r['time_ms_per_frame']
    return (f"{r['frames']} frames, {r['failures']} failures: median {_cm(r['median_translation_m'])} / "
            f"{r['median_rotation_deg']:.2f} deg; recall 5cm/5deg {r['recall_5cm_5deg']:.3f}, 10cm/10deg "
            f"{r['recall_10cm_10deg']:.3f}, 25cm/2deg {r['recall_25cm_2deg']:.3f}; "
            f"{t['mean']:.1f} ms/frame (p50 {t['p50']:.1f}, p99 {t['p99']:.1f}, {r['backend']}, {r['method']}"
            f"{', RGB-D' if r.get('depth_input') else ''}"
            + (f", {r['refined_fraction']:.0%} refined against the map" if r.get('place_map') else '') + "); "
            f"ungated median {_cm(r['ungated']['median_translation_m'])} / "
            f"{r['ungated']['median_rotation_deg']:.2f} deg"
            + (f"\npaths: {', '.join(f'{k} {v}' for k, v in r['paths'].items())}; published {r['published']}, "
               f"wrong (>= {WRONG[0] * 100:g} cm or {WRONG[1]:g} deg) {r['published_wrong']}"
               + (f", within 3 sigma {r['within_3_sigma']:.0%}" if r['published'] else '') if 'paths' in r else '')
            + ''.join(f"\n  rejected x{n}: {reason}" for reason, n in r.get('rejection_reasons', {}).items())
            + (f"\none-shot gate for <= {g['max_wrong']:.0%} wrong on these frames: max_residual_m "
               f"{g['max_residual_m']:.3f} lets {g['published']} of {r['frames']} through, recall 10cm/10deg "
               f"{g['recall_10cm_10deg']:.0%}" if (g := r.get('gate_calibration')) else '')
            + ''.join(f"\n  {row['from']:g}-{row['to'] or math.inf:g} m from the map's cameras "
                      f"({row['frames']} frames, median {row['median_angle_deg']:.0f} deg): recall 10cm/10deg "
                      f"{row['recall_10cm_10deg']:.0%} (one-shot {row['one_shot_recall_10cm_10deg']:.0%})"
                      for row in r.get('coverage_by_distance', []))
            + ''.join(f"\n  {row['from']:g}-{row['to'] or 180:g} deg from the nearest map camera "
                      f"({row['frames']} frames, median {row['median_distance_m']:.2f} m): recall 10cm/10deg "
                      f"{row['recall_10cm_10deg']:.0%} (one-shot {row['one_shot_recall_10cm_10deg']:.0%})"
                      for row in r.get('coverage_by_angle', []))
            + (f"; {r['frames_seen_in_training']} of these frames were training frames"
               if r.get('frames_seen_in_training') else '') + _heads_summary(r.get('heads')))


def _heads_summary(h: dict | None) -> str:
    if not h:
        return ''
    rec = h['with_recorded_depth']
    return (f"\nheads on {h['frames']} frames with recorded depth: depth error {_cm(h['median_depth_error_m'])}, "
            f"scene-coordinate error {_cm(h['median_scene_coord_error_m'])}; with the recorded depth in place of "
            f"the depth head: {_cm(rec['median_translation_m'])} / {rec['median_rotation_deg']:.2f} deg")


def _cm(m: float) -> str:
    return f'{m * 100:.2f} cm' if math.isfinite(m) else 'inf'


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).exists():
        raise FileNotFoundError(f'model file not found: {args.model}')
    if Path(args.model).suffix in ('.onnx', '.engine', '.plan', '.ts'):
        raise ValueError(f'{args.model}: eval takes the .pt model file it was exported from (--backend onnxruntime '
                         'runs it through ONNX Runtime as the node does)')
    if args.sequential and not args.map:
        raise ValueError('--sequential needs --map (the stream behaviour tracks against the map)')
    r = evaluate(args.model, args.bags, split=args.split, backend=args.backend, method=args.method,
                 json_path=args.json, plots_dir=args.plots, max_frames=args.max_frames,
                 topics=bg.parse_topics(args.topic), depth=args.depth, place_map=args.map,
                 sequential=args.sequential)
    print(format_summary(r))
    if args.json:
        print(f'wrote {args.json}')
    if args.plots:
        print(f'wrote {len(r["plots"])} plots to {args.plots}')
    return 0

