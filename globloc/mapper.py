"""`globloc map`: the place's surfaces as a map cloud, from bags with recorded depth (RGB-D refinement).

    globloc map --bags data/scene/seq_00 data/scene/seq_01 --out models/scene.map.npz

The node (parameter map_cloud) and `globloc eval --map` refine each confident RGB-D pose against it
(globloc_ros.mapcloud). Build it from the same bags as the model, and leave out what the model leaves out
(--holdout), so that a held-out evaluation stays held out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from globloc import bags as bg
from globloc import dataset as ds
from globloc_ros.mapcloud import VOXEL_M, build_map, save_map


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--bags', nargs='+', required=True, help='bags with recorded depth (folders/files)')
    p.add_argument('--out', required=True, help='map cloud file to write (.npz)')
    p.add_argument('--voxel', type=float, default=VOXEL_M, help=f'averaging voxel, metres (default {VOXEL_M})')
    p.add_argument('--stride', type=int, default=2, help='use every stride-th depth pixel (default 2)')
    p.add_argument('--holdout', default=None, help="'every:K': leave out the frames `globloc eval --split every:K` "
                                                   'scores, as `globloc train --holdout` does')
    p.add_argument('--force', action='store_true', help='overwrite an existing file')
    bg.add_topic_argument(p)


def run(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.exists() and not a.force:
        raise ValueError(f'{out} already exists; pass --force to overwrite it')
    if a.stride < 1:
        raise ValueError(f'--stride must be >= 1, got {a.stride}')
    topics = bg.parse_topics(a.topic)
    t0 = time.perf_counter()
    # label_fraction: the map does not use labels; the smallest share keeps reading cheap
    sequences = ds.load_sequences(a.bags, label_fraction=1e-6, progress=True, topics=topics, holdout=a.holdout)
    for s in sequences:
        if not any(f.depth is not None for f in s.frames):
            raise ValueError(f'{s.path}: no depth images on {topics.depth}; a map cloud needs recorded depth')
    frames = [f for s in sequences for f in s.frames if f.depth is not None]
    views = ((f.depth, f.K, f.T_map_cam) for f in tqdm(frames, desc='map', unit='frame'))
    cloud = build_map(views, voxel=a.voxel, stride=a.stride,
                      meta={'bags': [str(s.path) for s in sequences], 'frames': len(frames), 'holdout': a.holdout,
                            'stride': a.stride, 'command': shlex.join(['globloc', *sys.argv[1:]])})
    save_map(cloud, out)
    lo, hi = cloud.points.min(0), cloud.points.max(0)
    print(f'{out}: {len(cloud.points)} points ({a.voxel * 100:g} cm voxels) from {len(frames)} frames, extent '
          f'{" x ".join(f"{v:.1f}" for v in hi - lo)} m, {out.stat().st_size / 1e6:.1f} MB, '
          f'{time.perf_counter() - t0:.0f} s')
    return 0
