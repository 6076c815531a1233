"""`globloc bench-place`: a place map's file size, load time, memory and per-frame cost against the place's size.

    globloc bench-place --map data/scene/train.map.npz --bag data/scene/seq_02 --copies 1 4 8 \
        --json docs/place_scaling.json --plot docs/place_scaling.png

Stand-in for a large place: n x n copies of the map side by side, 1 m apart (side_by_side). For each n it writes
the map (placemap.save_map), loads it in this process (load time, RSS it adds, search trees built as the node
builds them) and times, on every --every-th frame of --bag (frames of the first copy), the three things a frame can
cost against it: feature refinement from the recorded pose, global recovery from the image alone and ICP from the
recorded pose with the recorded depth. Ratios are against the first --copies entry, measured in the same process.
The copies are identical, so which one recovery lands in is arbitrary: accuracy is not what this measures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from globloc import bags as bg
from globloc_ros import placemap as pm

STAGES = ('features', 'recovery', 'icp')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--map', required=True, help='a map file of `globloc map` (version 3)')
    p.add_argument('--bag', required=True, help='frames inside the mapped place (with depth for the ICP column)')
    p.add_argument('--copies', type=int, nargs='+', default=[1, 4, 8],
                   help='n for n x n copies side by side (default 1 4 8: 1, 16, 64 times the place)')
    p.add_argument('--every', type=int, default=10, help='time every N-th frame of the bag (default 10)')
    p.add_argument('--json', default=None, help='write the figures here')
    p.add_argument('--plot', default=None, help='write the plot here (PNG)')


def side_by_side(place: pm.PlaceMap, n: int, gap: float = 1.0) -> pm.PlaceMap:
    """n x n copies of a map (surfaces, features, keyframes) on a grid in x and y, gap metres apart."""
    extent = np.ptp(np.concatenate([place.points, place.feature_points]), 0) + gap
    offsets = np.array([[i * extent[0], j * extent[1], 0] for i in range(n) for j in range(n)], np.float32)
    poses = np.concatenate([place.keyframe_poses] * len(offsets))
    poses[:, :3, 3] += np.repeat(offsets, len(place.keyframe_poses), 0)
    copies = len(offsets)
    return dataclasses.replace(
        place, points=np.concatenate([place.points + o for o in offsets]), normals=np.tile(place.normals, (copies, 1)),
        feature_points=np.concatenate([place.feature_points + o for o in offsets]),
        descriptors=np.tile(place.descriptors, (copies, 1)), keyframe_poses=poses,
        keyframe_K=np.tile(place.keyframe_K, (copies, 1, 1)), keyframe_size=np.tile(place.keyframe_size, (copies, 1)),
        keyframe_bow=np.tile(place.keyframe_bow, (copies, 1)),
        keyframe_features=np.concatenate([place.keyframe_features + k * len(place.feature_points)
                                          for k in range(copies)]),
        keyframe_features_start=np.r_[0, np.cumsum(np.tile(np.diff(place.keyframe_features_start), copies))],
        meta=dict(place.meta, copies=copies))


def _rss_gb() -> float:
    return int(Path('/proc/self/status').read_text().split('VmRSS:')[1].split()[0]) / 1e6


def measure(place: pm.PlaceMap, n: int, frames: list[bg.Frame], work: Path) -> dict:
    """One row: n x n copies of place written, loaded and timed on frames."""
    path = work / f'place_x{n * n}.map.npz'
    pm.save_map(side_by_side(place, n), path)
    before = _rss_gb()
    t0 = time.perf_counter()
    big = pm.load_map(path)
    t1 = time.perf_counter()
    big.build_search_trees()  # as the node does before its first frame
    t2 = time.perf_counter()
    ms = {s: [] for s in STAGES}
    for f in tqdm(frames, desc=f'{n * n} copies', unit='frame', leave=False):
        for stage, call in (('features', lambda: pm.refine_features(big, f.T_map_cam, f.image, f.K, np.eye(6))),
                            ('recovery', lambda: pm.recover(big, f.image, f.K, None)),
                            ('icp', lambda: pm.refine_icp(big, f.T_map_cam, f.depth, f.K, np.eye(6)))):
            if stage == 'icp' and (f.depth is None or not len(big.points)):
                continue
            t = time.perf_counter()
            call()
            ms[stage].append(1e3 * (time.perf_counter() - t))
    row = {'copies': n * n, 'area_m2': round(float(np.prod(np.ptp(big.feature_points, 0)[:2])), 1),
           'surface_points': len(big.points), 'features': len(big.feature_points), 'keyframes': len(big.keyframe_poses),
           'file_mb': round(path.stat().st_size / 1e6, 1), 'load_s': round(t1 - t0, 2), 'trees_s': round(t2 - t1, 2),
           'rss_gb': round(_rss_gb() - before, 2),
           **{f'{s}_ms_p50': round(float(np.median(v)), 1) for s, v in ms.items() if v}}
    path.unlink()
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one row per size, the milliseconds with their ratio to the first row's."""
    base = rows[0]
    out = ['| copies | area (m2) | surface points | features | keyframes | file (MB) | load (s) | trees (s) | '
           'RSS (GB) | features ms p50 | recovery ms p50 | ICP ms p50 |', '|' + '---|' * 12]
    for r in rows:
        cells = [f'{r[k]:.1f} ({r[k] / base[k]:.1f}x)' if k in r else '' for k in (f'{s}_ms_p50' for s in STAGES)]
        out.append(f'| {r["copies"]} | {r["area_m2"]:.0f} | {r["surface_points"]:,} | {r["features"]:,} | '
                   f'{r["keyframes"]:,} | {r["file_mb"]:.1f} | {r["load_s"]:.2f} | {r["trees_s"]:.2f} | '
                   f'{r["rss_gb"]:.2f} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Map memory and load time, and per-frame milliseconds, against the place's area."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    area = [r['area_m2'] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(area, [r['rss_gb'] for r in rows], 'o-', label='memory the map adds (GB)')
    axes[0].plot(area, [r['load_s'] + r['trees_s'] for r in rows], 's-', label='load + search trees (s)')
    axes[0].set(xlabel='place area (m2)', title='the map in the node')
    for s in STAGES:
        if all(f'{s}_ms_p50' in r for r in rows):
            axes[1].plot(area, [r[f'{s}_ms_p50'] for r in rows], 'o-', label=s)
    axes[1].set(xlabel='place area (m2)', ylabel='ms per frame, p50', title='per frame')
    for ax in axes:
        ax.set_xscale('log')
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a: argparse.Namespace) -> int:
    place = pm.load_map(a.map)
    if not len(place.keyframe_features_start):
        raise ValueError(f'{a.map}: a map from before version 3 (no keyframe visibility): rebuild it with `globloc map`')
    if a.every < 1 or min(a.copies) < 1:
        raise ValueError(f'--every and --copies must be >= 1, got {a.every} and {a.copies}')
    frames = bg.read_sequence(a.bag, progress=False).frames[::a.every]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in a.copies:
            rows.append(measure(place, n, frames, Path(work)))
            print(rows[-1], flush=True)
    print(table(rows))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({'map': str(a.map), 'bag': str(a.bag), 'frames': len(frames),
                                            'rows': rows}, indent=1) + '\n')
    if a.plot:
        plot(rows, Path(a.plot))
    return 0
