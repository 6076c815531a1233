"""`globloc map`: a map of the place from its bags, to refine the node's poses against.

    globloc map --bags data/scene/seq_00 data/scene/seq_01 --out scene.map.npz

The map holds the surfaces (from recorded depth) and ORB image features with their 3D points (from recorded depth,
or triangulated between frames without it, with the bags' poses); globloc_ros.placemap. The node (parameter
place_map) and `globloc eval --map` refine each confident pose against it: ICP with a depth camera, feature matching
and PnP without. Build it from the same bags as the model, and leave out what the model leaves out (--holdout), so
that a held-out evaluation stays held out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from globloc import bags as bg
from globloc import dataset as ds
from globloc_ros.placemap import MAP_FEATURES, MAP_FEATURES_WITHOUT_DEPTH, VOXEL_M, View, build_map, save_map


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--bags', nargs='+', required=True, help='bags of the place (folders/files)')
    p.add_argument('--out', required=True, help='map file to write (.npz)')
    p.add_argument('--voxel', type=float, default=VOXEL_M, help=f'surface averaging voxel, metres (default {VOXEL_M})')
    p.add_argument('--stride', type=int, default=2, help='surfaces from every stride-th depth pixel (default 2)')
    p.add_argument('--features', type=int, default=None,
                   help=f'ORB features per frame (default {MAP_FEATURES} for a frame with depth, '
                        f'{MAP_FEATURES_WITHOUT_DEPTH} without, as only the features matched between frames are kept '
                        'there; 0: surfaces only)')
    p.add_argument('--holdout', default=None, help="'every:K': leave out the frames `globloc eval --split every:K` "
                                                   'scores, as `globloc train --holdout` does')
    p.add_argument('--force', action='store_true', help='overwrite an existing file')
    bg.add_topic_argument(p)


def run(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.exists() and not a.force:
        raise ValueError(f'{out} already exists; pass --force to overwrite it')
    if a.stride < 1 or (a.features or 0) < 0:
        raise ValueError(f'--stride must be >= 1 and --features >= 0, got {a.stride} and {a.features}')
    topics = bg.parse_topics(a.topic)
    t0 = time.perf_counter()
    paths = ds.training_bags(a.bags)
    bar = tqdm(desc='map', unit='frame')

    def views() -> Iterator[View]:
        """The bags' frames streamed one at a time (a long recording never sits in memory)."""
        # label_fraction: the map does not use labels; the smallest share keeps reading cheap
        for _, frames in ds.stream_bags(paths, label_fraction=1e-9, topics=topics, holdout=a.holdout):
            for f in frames:
                bar.update(1)
                yield View(f.image, f.K, f.T_map_cam, f.depth)

    place = build_map(views(), voxel=a.voxel, stride=a.stride, n_features=a.features,
                      meta={'bags': [str(p) for p in paths], 'holdout': a.holdout, 'stride': a.stride,
                            'command': shlex.join(['globloc', *sys.argv[1:]])})
    bar.close()
    place.meta['frames'] = bar.n
    save_map(place, out)
    extent = place.points if len(place.points) else place.feature_points
    print(f'{out}: {len(place.points)} surface points ({a.voxel * 100:g} cm voxels), {len(place.feature_points)} '
          f'features, from {bar.n} frames; extent '
          f'{" x ".join(f"{v:.1f}" for v in extent.max(0) - extent.min(0))} m, {out.stat().st_size / 1e6:.1f} MB, '
          f'{time.perf_counter() - t0:.0f} s')
    return 0
