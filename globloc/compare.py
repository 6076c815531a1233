"""`globloc compare`: this method vs the no-relative ablation vs the baselines, same data, same harness, one table.

    globloc compare --bags data/scene/seq_00 data/scene/seq_01 --test-bags data/scene/seq_02 \
        --steps 5000 --seeds 3 --out out/compare

Rows (METHOD.md section 6):
- globloc: this method (scene coordinates + depth + weights, one-shot Horn alignment, relative constraints);
- globloc --no-relative: the ablation, same steps;
- posenet: direct pose regression on the same backbone, same data and steps; all three over --seeds seeds (0, 1, ...);
- globloc + PnP: the same globloc networks' scene coordinates through cv2.solvePnPRansac instead of the alignment;
- with --map: the globloc and ablation networks again, each pose refined against that place map (`globloc map`),
  as the node does with place_map.
With --rgbd the two globloc rows train with `globloc train --rgbd` and are evaluated with the recorded depth
(`globloc eval --depth`), as an RGB-D camera runs the node; posenet and PnP use no depth. --w-pose / --w-rel set the
globloc rows' loss weights (default: train's).
A test bag that is also a training bag needs --split every:K: the models then train with --holdout every:K, so the
tested frames stay unseen.
Every model is evaluated on --test-bags by evaluate.evaluate (failures at infinite error). Writes DIR/compare.md,
DIR/compare.json, DIR/compare.png (translation error CDFs) and the models under DIR/models (kept; --reuse skips
training a model file that already exists, so an interrupted comparison can be continued).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from globloc import bags as bg
from globloc import dataset as ds
from globloc import evaluate as ev
from globloc.train import train

METRICS = ('median_translation_m', 'median_rotation_deg', 'recall_5cm_5deg', 'recall_10cm_10deg',
           'recall_25cm_2deg', 'failures', 'refined_fraction')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--bags', nargs='+', required=True, help='training bags')
    p.add_argument('--test-bags', nargs='+', required=True, help='held-out bags to evaluate on')
    p.add_argument('--steps', type=int, default=5000, help='training steps of every model (default 5000)')
    p.add_argument('--seeds', type=int, default=3, help='seeds of every trained row (default 3)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--split', default='all',
                   help="test split: 'all' or 'every:K' (needed when a test bag is also a training bag: the models "
                        "then train without those frames)")
    p.add_argument('--input-size', default='128x96')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--label-fraction', type=float, default=0.005)
    p.add_argument('--rgbd', action='store_true', help='globloc rows: train --rgbd, evaluate with the recorded depth')
    p.add_argument('--w-pose', type=float, default=None, help="globloc rows' L_pose weight (default: train's)")
    p.add_argument('--w-rel', type=float, default=None, help="globloc rows' L_adj + L_dist weight (default: train's)")
    p.add_argument('--sc-labels', choices=('sparse', 'dense'), default=None,
                   help="globloc rows' scene-coordinate labels (default: train's)")
    p.add_argument('--aug-translate', type=float, default=None,
                   help="every model's novel-view translation (fraction of the median depth; 0 = no novel views; "
                        "default: train's)")
    p.add_argument('--aug-turn', type=float, default=None,
                   help="every model's novel-view pan/tilt (deg; default: train's)")
    p.add_argument('--map', default=None, help='also refine the globloc rows against this place map (`globloc map`)')
    p.add_argument('--reuse', action='store_true', help='keep model files that already exist instead of retraining')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--quiet', action='store_true', help='no progress bars')


def _train_once(a, name: str, seed: int, holdout: str | None, **extra) -> tuple[Path, float]:
    out = Path(a.out) / 'models' / f'{name}_s{seed}.pt'
    if a.reuse and out.exists():
        meta = torch.load(out, map_location='cpu', weights_only=True)['meta']
        return out, float(meta.get('train_time_s', math.nan))
    t0 = time.perf_counter()
    train(bags=a.bags, out=out, steps=a.steps, seed=seed, input_size=a.input_size, batch=a.batch,
          label_fraction=a.label_fraction, force=True, quiet=a.quiet, threads=a.threads, holdout=holdout,
          **_augmentation(a), **extra)
    return out, time.perf_counter() - t0


def _augmentation(a) -> dict:
    """The novel-view flags given to compare, passed to every model's training (none: train's defaults)."""
    return {k: getattr(a, k) for k in ('aug_translate', 'aug_turn') if getattr(a, k, None) is not None}


def _holdout(a) -> str | None:
    """The split to leave out of training: --split when a test bag is a training bag too, else None."""
    shared = {p.resolve() for p in bg.bag_paths(a.bags)} & {p.resolve() for p in bg.bag_paths(a.test_bags)}
    if not shared:
        return None
    if ds.parse_split(a.split) == 1:
        raise ValueError(f'test bag(s) {sorted(map(str, shared))} are training bags too: give --split every:K, so '
                         f'the models train without the frames they are tested on')
    return a.split


def compare(a: argparse.Namespace) -> dict:
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.seeds < 1 or a.steps < 1:
        raise ValueError(f'--seeds and --steps must be >= 1 (got {a.seeds}, {a.steps})')
    holdout = _holdout(a)
    frames = ev.TestFrames(a.test_bags, a.split)  # streamed: never all images in memory
    if not frames:
        raise ValueError(f'no test frames in {a.test_bags}')
    rgbd = bool(getattr(a, 'rgbd', False))
    ours = {k: v for k, v in (('rgbd', rgbd), ('w_pose', getattr(a, 'w_pose', None)),
                              ('w_rel', getattr(a, 'w_rel', None)), ('sc_labels', getattr(a, 'sc_labels', None))) if v}
    place_map = getattr(a, 'map', None)
    # (model name, row label, pose method, training flags or None to reuse the model, refine against the map)
    plan = [('globloc', 'globloc', 'align', ours, False),
            ('globloc_norel', 'globloc --no-relative', 'align', {**ours, 'no_relative': True}, False),
            ('posenet', 'posenet (direct regression)', 'align', {'arch': 'posenet'}, False),
            ('globloc', 'globloc + PnP-RANSAC', 'pnp', None, False)]
    if place_map:
        plan += [('globloc', 'globloc + map', 'align', None, True),
                 ('globloc_norel', 'globloc --no-relative + map', 'align', None, True)]
    rows, curves = [], {}
    trained: dict[tuple[str, int], tuple[Path, float]] = {}
    for name, label, method, extra, refine in plan:
        runs = []
        for seed in range(a.seeds):
            if extra is not None:
                trained[(name, seed)] = _train_once(a, name, seed, holdout, **extra)
            model, train_s = trained[(name, seed)]
            r = ev.evaluate(model, a.test_bags, split=a.split, method=method, frames=frames,
                            depth=rgbd and name != 'posenet' and method == 'align',
                            place_map=place_map if refine else None)
            runs.append({'seed': seed, 'model': str(model), 'train_time_s': round(train_s, 1),
                         **{k: r[k] for k in METRICS}, 'time_ms_per_frame': r['time_ms_per_frame']['mean'],
                         'ungated_median_translation_m': r['ungated']['median_translation_m']})
            if seed == 0:
                curves[label] = np.array([x['translation_error_m'] if x['translation_error_m'] is not None
                                          else np.inf for x in r['per_frame']])
            if not a.quiet:
                print(f'{label} seed {seed}: {ev.format_summary(r)}', flush=True)
        rows.append({'method': label, 'runs': runs, **_aggregate(runs)})
    base, abl = rows[0], rows[1]
    reduction = 1.0 - base['median_translation_m_mean'] / abl['median_translation_m_mean'] \
        if abl['median_translation_m_mean'] > 0 else math.nan
    report = {'train_bags': [str(b) for b in a.bags], 'test_bags': [str(b) for b in a.test_bags],
              'test_frames': len(frames), 'steps': a.steps, 'seeds': a.seeds, 'input_size': a.input_size,
              'batch': a.batch, 'label_fraction': a.label_fraction, 'holdout': holdout, 'rgbd': rgbd,
              'globloc_weights': ours, 'augmentation': _augmentation(a), 'place_map': place_map and str(place_map),
              'device': 'cpu', 'threads': torch.get_num_threads(), 'rows': rows,
              'relative_constraints_translation_reduction': reduction,
              'posenet_over_globloc_median_ratio': rows[2]['median_translation_m_mean'] /
              max(base['median_translation_m_mean'], 1e-12)}
    (out_dir / 'compare.json').write_text(json.dumps(ev._jsonable(report), indent=1))
    (out_dir / 'compare.md').write_text(markdown_table(report))
    plot_cdfs(curves, out_dir / 'compare.png', f'{len(frames)} test frames, {a.steps} steps')
    return report


def _aggregate(runs: list[dict]) -> dict:
    out = {}
    for k in METRICS + ('time_ms_per_frame', 'train_time_s', 'ungated_median_translation_m'):
        v = np.array([r[k] for r in runs], dtype=np.float64)
        out[f'{k}_mean'] = float(v.mean())
        # A run with more than half its frames failing has an infinite median: the std is then undefined.
        out[f'{k}_std'] = float(v.std()) if len(v) > 1 and np.all(np.isfinite(v)) else 0.0 if len(v) == 1 else math.nan
    return out


def _pm(row: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    m, s = row[f'{key}_mean'] * scale, row[f'{key}_std'] * scale
    if not math.isfinite(m):
        return 'inf'
    return f'{m:.{digits}f}' + (f' ± {s:.{digits}f}' if len(row['runs']) > 1 else '')


def markdown_table(rep: dict) -> str:
    lines = [f"# globloc compare: {rep['test_frames']} held-out frames, {rep['steps']} steps, input "
             f"{rep['input_size']}, {rep['label_fraction'] * 100:g} % labels, CPU ({rep['threads']} threads)"
             + (', RGB-D: globloc rows trained with --rgbd and run with the recorded depth' if rep.get('rgbd') else '')
             + (f", globloc loss weights {rep['globloc_weights']}" if rep.get('globloc_weights') else '')
             + (f", augmentation {rep['augmentation']}" if rep.get('augmentation') else ''), '',
             f"train: {' '.join(rep['train_bags'])}  test: {' '.join(rep['test_bags'])}"
             + (f" (frames {rep['holdout']}, held out of training)" if rep.get('holdout') else ''), '',
             '| method | seeds | median t (cm) | median R (deg) | recall 5cm/5° | recall 10cm/10° | recall 25cm/2° | '
             'failures | refined | ungated median t (cm) | ms/frame | train s/run |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rep['rows']:
        lines.append(f"| {r['method']} | {len(r['runs'])} | {_pm(r, 'median_translation_m', 100)} | "
                     f"{_pm(r, 'median_rotation_deg')} | {_pm(r, 'recall_5cm_5deg', 1, 3)} | "
                     f"{_pm(r, 'recall_10cm_10deg', 1, 3)} | {_pm(r, 'recall_25cm_2deg', 1, 3)} | "
                     f"{_pm(r, 'failures', 1, 1)} | {_pm(r, 'refined_fraction', 1, 3)} | "
                     f"{_pm(r, 'ungated_median_translation_m', 100)} | "
                     f"{_pm(r, 'time_ms_per_frame', 1, 1)} | "
                     f"{_pm(r, 'train_time_s', 1, 0)} |")
    red = rep['relative_constraints_translation_reduction']
    lines += ['', f"Relative constraints {'reduce' if red >= 0 else 'increase'} the median translation error by "
                  f"{abs(100 * red):.1f} % vs the ablation (mean over seeds); "
                  f"direct regression's median is {rep['posenet_over_globloc_median_ratio']:.2f}x this method's.",
              "Ungated: the estimates' own median error with the confidence gate ignored (diagnostic).",
              'Values are mean ± std over seeds; failures count at infinite error. PnP rows reuse the globloc '
              'networks (no extra training). Timing: one frame at a time, resize + network + pose, this machine.']
    if rep.get('place_map'):
        lines.append(f"'+ map' rows: the same networks, poses refined against {rep['place_map']}; 'refined': the "
                     'share of frames whose refinement was taken (the others keep the one-shot pose).')
    lines.append('')
    return '\n'.join(lines)


def plot_cdfs(curves: dict[str, np.ndarray], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, err in curves.items():
        n = len(err)
        e = np.sort(err[np.isfinite(err)]) * 100
        ax.step(e, np.arange(1, len(e) + 1) / n, where='post', label=label)
    ax.set_xscale('log')
    ax.set_xlabel('translation error (cm), log scale')
    ax.set_ylabel('fraction of test frames')
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    ax.set_title(f'held-out error CDF (seed 0): {title}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    compare(args)
    print((Path(args.out) / 'compare.md').read_text())
    return 0
