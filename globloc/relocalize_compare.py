"""`globloc relocalize-compare`: globloc (one-shot, + map) beside SIFT + PnP-RANSAC against the same map frames,
on the same query frames, timed the same way, in one run: one table, JSON and a plot.

    globloc relocalize-compare --model m.pt --map-bags MAP --query-bags QUERY [--depth --rgbd-model m_rgbd.pt] \
        --out out/reloc
    # one bag split by time: the first 25 frames map, the next 25 query
    globloc relocalize-compare --model m.pt --map-bags B --map-frames 0:25 --query-bags B --query-frames 25:50 ...

Rows (issue 29's table):
- SIFT + PnP-RANSAC: globloc.sift_pnp, a SIFT map built from the map frames, their depth and poses (keypoints
  back-projected with the recorded depth, or triangulated between frames with the poses where there is none);
- globloc one-shot, image only: `globloc eval` without a map;
- globloc + map, image only: `globloc eval --map`, the place map (`globloc map`) built from the same map frames
  (or --map FILE): refined near the one-shot pose, recovered globally when that fails;
- with --depth, the same two with each frame's recorded depth (one-shot RGB-D, + map with ICP), model --rgbd-model.
Every row localizes each query frame on its own (single-image relocalization), after 3 warm-up frames, timed from
the recorded image to the pose. A frame without a pose (SIFT: fewer than sift_pnp.MIN_INLIERS PnP inliers; globloc:
the confidence gate or the map refused it) counts at infinite error in the medians and recalls. 'published wrong':
poses given out that are >= 25 cm or 10 deg off (evaluate.WRONG). Writes DIR/relocalize.md, relocalize.json
(rows, per-frame errors and times, paths), relocalize.png (recall against the error threshold per method, and
ms/frame) and, unless --map is given, DIR/place.map.npz.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from globloc import bags as bg
from globloc import evaluate as ev
from globloc import sift_pnp
from globloc_ros import frames as fr
from globloc_ros.placemap import View, build_map, save_map

WARMUP = 3  # as evaluate.localize_frames
SIFT_ROW = 'SIFT + PnP-RANSAC'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', required=True, help='model file for the image-only rows')
    p.add_argument('--rgbd-model', default=None,
                   help='model file for the RGB-D rows (--depth; e.g. trained with --rgbd; default --model)')
    p.add_argument('--map-bags', nargs='+', required=True, help='bags of the mapping pass')
    p.add_argument('--query-bags', nargs='+', required=True, help='bags of the query pass')
    p.add_argument('--map-frames', default=None, metavar='A:B',
                   help="only the frames with index A <= i < B of each map bag (Python slice; 'A:' to the end)")
    p.add_argument('--query-frames', default=None, metavar='A:B', help='the same for each query bag')
    p.add_argument('--map', default=None, metavar='FILE',
                   help='a place map file to use for the globloc rows (default: built here from the map frames)')
    p.add_argument('--map-features', type=int, default=None,
                   help='ORB features per frame of the place map built here (default: as `globloc map`)')
    p.add_argument('--depth', action='store_true', help='also the RGB-D rows (the query frames need recorded depth)')
    p.add_argument('--backend', default='onnxruntime', choices=('torch', 'onnxruntime', 'auto'),
                   help="the Localizer's backend (default onnxruntime)")
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--threads', type=int, default=None, help='CPU threads of torch and OpenCV (default: theirs)')
    bg.add_topic_argument(p)


def parse_range(text: str | None) -> tuple[int, int | None]:
    """'A:B' -> (A, B); 'A:' -> (A, None); ':B' -> (0, B); None -> (0, None)."""
    if text is None:
        return 0, None
    try:
        a, b = text.split(':')
        start, stop = int(a or 0), int(b) if b else None
    except ValueError:
        raise ValueError(f"frame range must be 'A:B' (A <= index < B; either may be left out), got {text!r}") from None
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f'frame range {text!r} is empty or negative')
    return start, stop


def read_frames(bags, index_range: tuple[int, int | None], topics: bg.Topics) -> list[bg.Frame]:
    """The frames with start <= index < stop of each bag (frame.seq: the bag's position in `bags`)."""
    start, stop = index_range
    out = []
    for i, path in enumerate(bg.bag_paths(bags)):
        seq = bg.read_sequence(path, seq=i, topics=topics, max_frames=stop, label_fraction=1e-9, progress=False)
        out += [f for f in seq.frames if f.index >= start]
    return out


def _check_disjoint(a: argparse.Namespace) -> None:
    """A query frame that is also a map frame is not relocalization: refuse overlapping ranges of one bag."""
    shared = {p.resolve() for p in bg.bag_paths(a.map_bags)} & {p.resolve() for p in bg.bag_paths(a.query_bags)}
    (m0, m1), (q0, q1) = parse_range(a.map_frames), parse_range(a.query_frames)
    if shared and max(m0, q0) < min(m1 if m1 is not None else math.inf, q1 if q1 is not None else math.inf):
        raise ValueError(f'{sorted(map(str, shared))} are map and query bags with overlapping frame ranges '
                         f'(--map-frames {a.map_frames}, --query-frames {a.query_frames}): give disjoint ranges')


def _views(frames: list[bg.Frame]):
    return (View(f.image, f.K, f.T_map_cam, f.depth) for f in frames)


def run_sift(sift_map: sift_pnp.SiftMap, frames: list[bg.Frame]):
    """SIFT + PnP on each frame -> T_est (N, 4, 4), ok (N,), time_ms (N,), inliers (N,); timed as
    evaluate.localize_frames times the Localizer (after WARMUP frames, the call alone)."""
    loc = sift_pnp.SiftLocalizer(sift_map)
    for f in frames[:WARMUP]:
        loc(f.image, f.K)
    T, ok, times, inliers = np.zeros((len(frames), 4, 4)), np.zeros(len(frames), bool), np.zeros(len(frames)), []
    for k, f in enumerate(frames):
        t0 = time.perf_counter()
        T[k], ok[k], extra = loc(f.image, f.K)
        times[k] = (time.perf_counter() - t0) * 1e3
        inliers.append(extra['inliers'])
    return T, ok, times, np.array(inliers)


def make_row(method: str, ok: np.ndarray, t_raw: np.ndarray, r_raw: np.ndarray, times: np.ndarray) -> dict:
    """One table row from per-frame results: ok (N,) a pose was given out; t_raw, r_raw (N,) its error (m, deg;
    whatever it is where ok is False); times (N,) ms."""
    t = np.where(ok, t_raw, np.inf)
    r = np.where(ok, r_raw, np.inf)
    wrong = ok & ((t_raw >= ev.WRONG[0]) | (r_raw >= ev.WRONG[1]))
    row = {'method': method, 'frames': len(t), 'median_translation_m': float(np.median(t)),
           'median_rotation_deg': float(np.median(r)), 'no_pose': int((~ok).sum()), 'published': int(ok.sum()),
           'published_wrong': int(wrong.sum()),
           'ms_p50': float(np.percentile(times, 50)), 'ms_p90': float(np.percentile(times, 90)),
           'per_frame': {'translation_error_m': t.tolist(), 'rotation_error_deg': r.tolist(),
                         'time_ms': np.round(times, 3).tolist()}}
    for m, d in ev.RECALLS:
        row[f'recall_{round(m * 100)}cm_{d:g}deg'] = float(np.mean((t <= m) & (r <= d)))
    return row


def globloc_row(method: str, model, frames, bags, backend: str, depth: bool, place_map) -> dict:
    """A globloc row by evaluate.evaluate (the node's Localizer and gate), with its frames per path."""
    rep = ev.evaluate(model, bags, backend=backend, frames=frames, depth=depth, place_map=place_map)
    pf = rep['per_frame']
    nan_to_inf = lambda x: np.inf if x is None else x  # noqa: E731
    row = make_row(method, np.array([p['confident'] for p in pf]),
                   np.array([nan_to_inf(p['ungated_translation_error_m']) for p in pf]),
                   np.array([nan_to_inf(p['ungated_rotation_error_deg']) for p in pf]),
                   np.array([p['time_ms'] for p in pf]))
    row['per_frame']['path'] = [p.get('path', 'one-shot') for p in pf]
    row.update({k: rep[k] for k in ('model', 'paths', 'rejection_reasons', 'within_3_sigma', 'coverage_by_distance',
                                    'coverage_by_angle') if k in rep})
    paths = np.array(row['per_frame']['path'])
    times = np.array(row['per_frame']['time_ms'])
    row['ms_by_path'] = {p: {'p50': float(np.percentile(times[paths == p], 50)),
                             'p90': float(np.percentile(times[paths == p], 90))} for p in row.get('paths', {})}
    return row


def relocalize_compare(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in (a.model, a.rgbd_model):
        if m and not Path(m).is_file():
            raise FileNotFoundError(f'model file not found: {m}')
    _check_disjoint(a)
    if a.threads:
        torch.set_num_threads(a.threads)
        cv2.setNumThreads(a.threads)
    topics = bg.parse_topics(a.topic)
    map_frames = read_frames(a.map_bags, parse_range(a.map_frames), topics)
    query = read_frames(a.query_bags, parse_range(a.query_frames), topics)
    if not map_frames or not query:
        raise ValueError(f'{len(map_frames)} map frames and {len(query)} query frames: need both')
    if a.depth and (missing := sum(f.depth is None for f in query)):
        raise ValueError(f'--depth: {missing} of {len(query)} query frames have no recorded depth')
    print(f'{len(map_frames)} map frames, {len(query)} query frames', flush=True)
    load_before = os.getloadavg()[0]

    t0 = time.perf_counter()
    place_map = a.map
    if place_map is None:
        place_map = out / 'place.map.npz'
        save_map(build_map(_views(map_frames), n_features=a.map_features,
                           meta={'bags': [str(b) for b in a.map_bags], 'frames': len(map_frames),
                                 'frame_range': a.map_frames, 'command': 'globloc relocalize-compare'}), place_map)
    map_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sift_map = sift_pnp.build_sift_map(_views(map_frames))
    sift_map_s = time.perf_counter() - t0
    print(f'maps: place map {place_map} ({map_s:.0f} s), SIFT map {sift_map.meta["points"]} points '
          f'({sift_map_s:.0f} s)', flush=True)

    T_gt = np.stack([f.T_map_cam for f in query])
    T, ok, times, inliers = run_sift(sift_map, query)
    t_raw, r_raw = fr.pose_errors(T, T_gt)
    rows = [make_row(SIFT_ROW, ok, t_raw, r_raw, times)]
    rows[0]['per_frame']['inliers'] = inliers.tolist()
    plan = [('globloc one-shot, image only', a.model, False, None),
            ('globloc + map, image only', a.model, False, place_map)]
    if a.depth:
        rgbd = a.rgbd_model or a.model
        plan += [('globloc one-shot, RGB-D', rgbd, True, None), ('globloc + map (ICP), RGB-D', rgbd, True, place_map)]
    for method, model, depth, pm in plan:
        rows.append(globloc_row(method, model, query, a.query_bags, a.backend, depth, pm))
    for r in rows:
        print(f"{r['method']}: {_cells(r)}", flush=True)

    report = {'command': shlex.join(['globloc', *sys.argv[1:]]), 'code': git_head(),
              'map_bags': [str(b) for b in a.map_bags], 'map_frames': a.map_frames,
              'query_bags': [str(b) for b in a.query_bags], 'query_frames': a.query_frames,
              'map_frame_count': len(map_frames), 'query_frame_count': len(query),
              'recorded_size': list(query[0].image.shape[1::-1]), 'place_map': str(place_map),
              'place_map_built_s': None if a.map else round(map_s, 1), 'sift_map': sift_map.meta,
              'sift_map_built_s': round(sift_map_s, 1), 'backend': a.backend, 'depth': a.depth,
              'device': 'cpu', 'cpus': os.cpu_count(),
              'load_average': [round(load_before, 2), round(os.getloadavg()[0], 2)],
              'torch_threads': torch.get_num_threads(), 'opencv_threads': cv2.getNumThreads(),
              'rows': rows, 'speed_ratio': speed_ratios(rows)}
    (out / 'relocalize.json').write_text(json.dumps(ev._jsonable(report), indent=1))
    (out / 'relocalize.md').write_text(markdown(report))
    plot(report, out / 'relocalize.png')
    return report


def git_head() -> str | None:
    """The code's commit (short hash, '+' when the work tree has changes), None outside a git checkout."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        head = git('rev-parse', '--short', 'HEAD')
        return head + ('+' if git('status', '--porcelain', '--untracked-files=no') else '') if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def speed_ratios(rows: list[dict]) -> dict:
    """SIFT + PnP's p50 ms/frame over each '+ map' row's."""
    sift = next(r for r in rows if r['method'] == SIFT_ROW)
    return {r['method']: sift['ms_p50'] / r['ms_p50'] for r in rows if '+ map' in r['method'] and r['ms_p50'] > 0}


def _cells(r: dict) -> str:
    med = (f"{r['median_translation_m'] * 100:.2f} cm / {r['median_rotation_deg']:.2f} deg"
           if math.isfinite(r['median_translation_m']) else '- (over half without a pose)')
    return ' | '.join([med, f"{r['recall_5cm_5deg']:.0%}", f"{r['recall_10cm_10deg']:.0%}", str(r['no_pose']),
                       f"{r['published_wrong']} of {r['published']}", f"{r['ms_p50']:.1f} ({r['ms_p90']:.1f})"])


def markdown(rep: dict) -> str:
    def where(bags, rng):
        return ' '.join(bags) + (f' (frames {rng})' if rng else '')
    sm = rep['sift_map']
    lines = [f"# Relocalization: {rep['query_frame_count']} query frames against a map of {rep['map_frame_count']}",
             '', f"map: {where(rep['map_bags'], rep['map_frames'])}; query: "
                 f"{where(rep['query_bags'], rep['query_frames'])}; {rep['recorded_size'][0]}x"
                 f"{rep['recorded_size'][1]} images; CPU, torch {rep['torch_threads']} / OpenCV "
                 f"{rep['opencv_threads']} threads of {rep['cpus']} cores (load average "
                 f"{' -> '.join(map(str, rep['load_average']))} over the run), backend {rep['backend']}, code "
                 f"{rep.get('code')}.",
             f"Place map: {rep['place_map']}. SIFT map: {sm['points']} points from {sm['frames']} frames "
             f"({sm['frames_with_depth']} with depth"
             + (f", the others triangulated over {sm['pairs']} frame pairs" if sm.get('pairs') else '') + ').', '',
             '| method | median | 5cm/5deg | 10cm/10deg | no pose | published >= 25 cm or 10 deg (of published) | '
             'ms/frame p50 (p90) |', '|---|---|---|---|---|---|---|']
    lines += [f"| {r['method']} | {_cells(r)} |" for r in rep['rows']]
    lines.append('')
    for r in rep['rows']:
        if '+ map' in r['method'] and r.get('paths'):
            lines.append(f"- {r['method']}, frames per path: " + ', '.join(
                f"{p} {n} ({r['ms_by_path'][p]['p50']:.1f} / {r['ms_by_path'][p]['p90']:.1f} ms p50 / p90)"
                for p, n in r['paths'].items())
                + (f"; published within 3 sigma {r['within_3_sigma']:.0%}"
                   if math.isfinite(r.get('within_3_sigma', math.nan)) else ''))
    for method, ratio in rep['speed_ratio'].items():
        lines.append(f'- speed: {SIFT_ROW} p50 / {method} p50 = {ratio:.1f}x')
    lines += ['', 'Each frame localized on its own after 3 warm-up frames, timed from the recorded image to the pose '
                  '(all rows in one process, on the same frames); a frame without a pose counts at infinite error.',
              '']
    return '\n'.join(lines)


def plot(rep: dict, path: Path) -> Path:
    """Recall against the translation and the rotation threshold per method, and ms/frame (p50 bar, p90 tick)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={'width_ratios': [1, 1, 0.8]})
    for ax, key, scale, unit, lo, hi in ((axes[0], 'translation_error_m', 100.0, 'translation error (cm)', 0.1, 100),
                                         (axes[1], 'rotation_error_deg', 1.0, 'rotation error (deg)', 0.01, 30)):
        for r in rep['rows']:
            e = np.array([np.inf if x is None else x for x in r['per_frame'][key]]) * scale
            x = np.sort(e[np.isfinite(e)])
            lo = min(lo, x[0] / 1.5) if len(x) and x[0] > 0 else lo
            ax.step(np.r_[x, 10 * hi], np.r_[np.arange(1, len(x) + 1), len(x)] / len(e), where='post',
                    label=r['method'] if ax is axes[0] else None)
        ax.set(xscale='log', xlim=(lo, hi), ylim=(0, 1), xlabel=f'{unit}, threshold', ylabel='recall (of all frames)')
        ax.grid(alpha=0.3, which='both')
    names = [r['method'].replace(', ', '\n') for r in rep['rows']]
    x = np.arange(len(names))
    p50 = np.array([r['ms_p50'] for r in rep['rows']])
    p90 = np.array([r['ms_p90'] for r in rep['rows']])
    axes[2].bar(x, p50, color=[f'C{k}' for k in x])
    axes[2].errorbar(x, p50, yerr=[np.zeros_like(p50), p90 - p50], fmt='none', ecolor='black', capsize=4)
    axes[2].set_xticks(x, names, fontsize=7, rotation=30, ha='right')
    axes[2].set(ylabel='ms/frame (bar p50, whisker p90)', yscale='log')
    axes[2].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 1, 2, 5, 10, 20, ... ms
    axes[2].yaxis.set_major_formatter(ScalarFormatter())
    axes[2].yaxis.set_minor_formatter(NullFormatter())
    fig.legend(loc='lower center', ncol=len(rep['rows']), fontsize=8)
    fig.suptitle(f"{rep['query_frame_count']} query frames: {' '.join(rep['query_bags'])}"
                 + (f" ({rep['query_frames']})" if rep['query_frames'] else ''), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    relocalize_compare(args)
    print((Path(args.out) / 'relocalize.md').read_text())
    print(f"wrote {Path(args.out) / 'relocalize.md'}, relocalize.json, relocalize.png")
    return 0
