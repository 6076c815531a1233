"""The training cache: a training set's bags decoded once, at the network input size, into memory-mapped arrays.

    data, triangulated = cache.train_data(bags, CacheSettings(input_size=(128, 96), ...), root)

The first run streams the bags (bags.BagReader, one frame in memory at a time) into flat files; later runs, a
`--resume` and every torchrun rank map those files (TrainData's tensors then live in the page cache, not in the
process). A cache is a folder root/<key>/ named by a hash of
- each bag's content: for every file of the bag, its name, size, modification time and the SHA-1 of its first
  and last 64 KiB (cheap; a bag rewritten in place changes them), and
- every setting that shapes the arrays (CacheSettings: input size, stride, label fraction, seed, topics, max
  frames, holdout, whether labels are triangulated) and FORMAT.
A changed bag or setting gives another key, so a stale cache is never read; building a set's new cache removes
its stale ones (same bags and settings, other contents). A cache is written into a temporary folder and renamed
into place when complete, so a build that dies leaves nothing, and two processes building the same cache at once
both end with a whole one.

Files (N frames, input W x H, stride s, M labels per frame at most): images.u8 (N, 3, H, W), K.f32 (N, 3, 3),
T.f32 (N, 4, 4), depth.f32 (N, H/s, W/s), depth_full.f32 (N, H, W), labels.f32 (N, M, 5), label_mask.bool (N, M),
seq.i64 (N,), edges.npz (i, j, kind, T_i_j, covariance) and meta.json (settings, bags, shapes, stats).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from globloc import bags as bg
from globloc import dataset as ds
from globloc import graph as gr
from globloc_ros.runtime import default_cache_dir

FORMAT = 1
ARRAYS = {  # name: dtype; shapes from meta.json
    'images': np.uint8, 'K': np.float32, 'T': np.float32, 'depth': np.float32, 'depth_full': np.float32,
    'labels': np.float32, 'label_mask': np.bool_, 'seq': np.int64}
_SUFFIX = {np.uint8: 'u8', np.float32: 'f32', np.bool_: 'bool', np.int64: 'i64'}
_PROBE = 64 * 1024  # bytes hashed at each end of every file of a bag
T = TypeVar('T')


@dataclass(frozen=True)
class CacheSettings:
    """What shapes a training set's arrays besides its bags (see dataset.load_sequences / build_train_data)."""
    input_size: tuple[int, int]
    label_fraction: float
    seed: int = 0
    stride: int = 8
    topics: bg.Topics = bg.Topics()
    max_frames: int | None = None
    holdout: str | None = None
    triangulate: bool = True  # label the frames without depth or landmarks by triangulation (globloc models)


def default_root() -> Path:
    """$GLOBLOC_CACHE/train, or ~/.cache/globloc/train."""
    return default_cache_dir() / 'train'


def bag_fingerprint(path: Path) -> list:
    """[name, size, mtime ns, SHA-1 of the first and last 64 KiB] of each file of a bag (folder or file)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    out = []
    for f in files:
        st = f.stat()
        h = hashlib.sha1()
        with f.open('rb') as fh:
            h.update(fh.read(_PROBE))
            if st.st_size > _PROBE:
                fh.seek(max(_PROBE, st.st_size - _PROBE))
                h.update(fh.read(_PROBE))
        out.append([f.name, st.st_size, st.st_mtime_ns, h.hexdigest()])
    return out


def describe(paths: list[Path], settings: CacheSettings) -> dict:
    """The JSON-able description a cache is keyed by (without the bags' contents: `which`)."""
    d = dataclasses.asdict(settings)
    d['input_size'] = list(settings.input_size)
    return {'format': FORMAT, 'bags': [str(Path(p).resolve()) for p in paths], **d}


def cache_key(paths: list[Path], settings: CacheSettings) -> str:
    which = {**describe(paths, settings), 'contents': [bag_fingerprint(p) for p in paths]}
    return hashlib.sha256(json.dumps(which, sort_keys=True).encode()).hexdigest()[:20]


def train_data(bag_args, settings: CacheSettings, root: Path | None = None, progress: bool = False,
               build: bool = True, log=None) -> tuple[ds.TrainData, dict | None]:
    """The training set of `bag_args` as TrainData over memory-mapped cache files (built first when missing or
    stale, unless build=False: then FileNotFoundError). Returns it and the triangulation summary (dataset.
    triangulated_labels; None when no frame needed labels). log(str): where to say that a cache was built."""
    paths = ds.training_bags(bag_args)
    root = Path(root) if root is not None else default_root()
    folder = root / cache_key(paths, settings)
    if not _complete(folder):
        if not build:
            raise FileNotFoundError(f'no training cache {folder} for {[str(p) for p in paths]}')
        _build(folder, paths, settings, progress, log)
    return load(folder)


def _complete(folder: Path) -> bool:
    """A cache folder with its meta.json and every array file of the size it states."""
    try:
        meta = json.loads((folder / 'meta.json').read_text())
        return all((folder / _file(name)).stat().st_size == _nbytes(meta['shapes'][name], dtype)
                   for name, dtype in ARRAYS.items()) and (folder / 'edges.npz').exists()
    except (OSError, ValueError, KeyError):
        return False


def _file(name: str) -> str:
    return f'{name}.{_SUFFIX[ARRAYS[name]]}'


def _nbytes(shape: list[int], dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def load(folder: Path) -> tuple[ds.TrainData, dict | None]:
    """TrainData whose tensors map the cache's files (copy-on-write: nothing is written back)."""
    meta = json.loads((folder / 'meta.json').read_text())
    t = {name: torch.from_numpy(np.memmap(folder / _file(name), dtype=dtype, mode='c',
                                          shape=tuple(meta['shapes'][name])))
         for name, dtype in ARRAYS.items()}
    with np.load(folder / 'edges.npz') as e:
        T, cov = e['T_i_j'], e['covariance']
        edges = [gr.Edge(int(i), int(j), int(k), T[n], cov[n])
                 for n, (i, j, k) in enumerate(zip(e['i'].tolist(), e['j'].tolist(), e['kind'].tolist()))]
    stats = meta['stats']
    data = ds.TrainData(images=t['images'], K=t['K'], T_map_cam=t['T'], depth=t['depth'],
                        depth_full=t['depth_full'], labels=t['labels'], label_mask=t['label_mask'], seq=t['seq'],
                        edges=edges, edges_source=stats['edges_source'], paths=meta['bags'],
                        input_size=tuple(meta['input_size']), stride=meta['stride'], stats=stats)
    return data, meta['triangulated']


def _build(folder: Path, paths: list[Path], settings: CacheSettings, progress: bool, log) -> None:
    W, H = settings.input_size
    s = settings.stride
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f'.{folder.name}.{os.getpid()}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        meta = _write(tmp, paths, settings, progress)
        # CPU seconds (both threads): on a shared machine the wall time also counts the others' load
        meta['build_s'], meta['build_cpu_s'] = round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)
        (tmp / 'meta.json').write_text(json.dumps(meta, indent=1) + '\n')
        if folder.exists() and not _complete(folder):  # damaged (a file cut short or removed): replace it
            trash = root / f'.{folder.name}.{os.getpid()}.damaged'
            folder.rename(trash)
            shutil.rmtree(trash)
        try:
            tmp.rename(folder)
        except OSError:  # another process (a torchrun rank) renamed its own complete copy first
            if not _complete(folder):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(root, folder, describe(paths, settings))
    n, build_s, cpu_s = meta['stats']['frames'], meta['build_s'], meta['build_cpu_s']
    size = sum(f.stat().st_size for f in folder.iterdir())
    (log or (lambda line: print(line, file=sys.stderr)))(
        f'training cache {folder}: built {n} frames in {build_s:.1f} s ({n / max(build_s, 1e-9):.0f} frames/s; '
        f'{cpu_s:.1f} s CPU, {n / max(cpu_s, 1e-9):.0f} frames per CPU second), {size / 1e6:.0f} MB at {W}x{H} '
        f'(stride {s})')


def _remove_stale(root: Path, keep: Path, description: dict) -> None:
    """Remove the caches of the same bags and settings built from other contents of the bags."""
    for other in root.iterdir():
        if other == keep or not other.is_dir() or other.name.startswith('.'):
            continue
        try:
            stale = json.loads((other / 'meta.json').read_text())['description'] == description
        except (OSError, ValueError, KeyError):
            continue
        if stale:
            shutil.rmtree(other, ignore_errors=True)


def _write(tmp: Path, paths: list[Path], settings: CacheSettings, progress: bool) -> dict:
    """Stream the bags into tmp's files; returns meta.json's content (without build_s)."""
    W, H = settings.input_size
    stride = settings.stride
    out = {name: (tmp / (_file(name) if name != 'labels' else 'labels.flat')).open('wb')
           for name in ('images', 'K', 'T', 'depth', 'depth_full', 'labels', 'seq')}
    counts: list[int] = []  # labels per frame (0 for the frames to triangulate)
    to_triangulate: list[tuple[int, tuple]] = []  # (frame number, triangulation view) of unlabelled frames
    stamps, sizes = [], []
    tracks, per_sequence, with_depth, recorded = [], [], 0, None
    bar = tqdm(desc='training cache', unit='frame', disable=not progress, dynamic_ncols=True)
    try:
        for reader, frames in ds.stream_bags(paths, settings.label_fraction, seed=settings.seed,
                                             max_frames=settings.max_frames, topics=settings.topics,
                                             holdout=settings.holdout):
            bar.total = (bar.total or 0) + reader.expected_images
            bar.refresh()
            seq_stamps, seq_poses = [], []
            for f in _prefetched(frames):
                if not np.all(np.isfinite(f.T_map_cam)):
                    raise ValueError(f'{reader.path}: frame {f.index} has a non-finite pose')
                img, K, depth, depth_full, lm = ds.frame_arrays(f, (W, H), stride)
                if settings.triangulate and f.landmarks is None and f.depth is None:
                    to_triangulate.append((len(counts), ds.triangulation_view(f.image, f.K, f.T_map_cam,
                                                                              settings.label_fraction)))
                    stamps.append(f.stamp_ns)
                    sizes.append(f.image.shape[1::-1])
                recorded = recorded or [int(f.image.shape[1]), int(f.image.shape[0])]
                out['images'].write(np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes())
                out['K'].write(K.astype(np.float32).tobytes())
                out['T'].write(f.T_map_cam.astype(np.float32).tobytes())
                out['depth'].write(depth.astype(np.float32).tobytes())
                out['depth_full'].write(depth_full.astype(np.float32).tobytes())
                out['labels'].write(lm.astype(np.float32).tobytes())
                out['seq'].write(np.int64(f.seq).tobytes())
                counts.append(len(lm))
                with_depth += f.depth is not None
                seq_stamps.append(f.stamp_ns)
                seq_poses.append(f.T_map_cam)
                bar.update(1)
            tracks.append(bg.Track(reader.path, reader.seq, np.array(seq_stamps, np.int64),
                                   np.array(seq_poses, np.float64).reshape(-1, 4, 4), reader.edges))
            per_sequence.append(len(seq_stamps))
    finally:
        bar.close()
        for f in out.values():
            f.close()
    n = len(counts)
    if n == 0:
        raise ValueError('the bags hold no frames')

    triangulated, extra = None, {}
    if to_triangulate:
        labels, triangulated = ds.triangulated_labels([v for _, v in to_triangulate], stamps, sizes,
                                                      settings.label_fraction, settings.seed)
        for (k, _), lm, (w0, h0) in zip(to_triangulate, labels, sizes):
            extra[k] = ds.labels_at_input(lm, W / w0, H / h0, (W, H))
            counts[k] = len(extra[k])
    m = max(1, max(counts))
    _pad_labels(tmp, counts, extra, m)

    edges, source = gr.scene_edges(tracks)
    np.savez(tmp / 'edges.npz', i=np.array([e.i for e in edges], np.int64),
             j=np.array([e.j for e in edges], np.int64), kind=np.array([e.kind for e in edges], np.int64),
             T_i_j=np.array([e.T_i_j for e in edges], np.float64).reshape(-1, 4, 4),
             covariance=np.array([e.covariance for e in edges], np.float64).reshape(-1, 6, 6))
    n_labelled = sum(c > 0 for c in counts)
    stats = {'frames': n, 'frames_per_sequence': per_sequence, 'frames_with_depth': int(with_depth),
             'frames_with_labels': int(n_labelled), 'labels_per_frame_mean': float(sum(counts) / n),
             'recorded_size': recorded, 'edges': gr.edge_counts(edges),
             'edges_source': source}
    h, w = H // stride, W // stride
    shapes = {'images': [n, 3, H, W], 'K': [n, 3, 3], 'T': [n, 4, 4], 'depth': [n, h, w], 'depth_full': [n, H, W],
              'labels': [n, m, 5], 'label_mask': [n, m], 'seq': [n]}
    return {'description': describe(paths, settings), 'bags': [str(p) for p in paths],
            'input_size': [W, H], 'stride': stride, 'shapes': shapes, 'stats': stats, 'triangulated': triangulated}


def _prefetched(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """`items` produced by a second thread, up to `depth` ahead: the bag's reading and decoding (zstd, cv2 and
    numpy let go of the GIL) overlap the caller's resizing and writing. Stopping early stops the thread too."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put((True, x), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((False, None))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            q.put((False, e))
        finally:
            if hasattr(items, 'close'):
                items.close()

    thread = threading.Thread(target=produce, name='cache-reader', daemon=True)
    thread.start()
    try:
        while True:
            more, x = q.get()
            if not more:
                if x is not None:
                    raise x
                return
            yield x
    finally:
        stop.set()
        while thread.is_alive():  # let it out of a blocked put
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _pad_labels(tmp: Path, counts: list[int], extra: dict[int, np.ndarray], m: int) -> None:
    """labels.flat (sum(counts), 5) -> labels.f32 (N, m, 5) zero-padded and label_mask.bool (N, m), a frame at a
    time through plain reads and writes (a mapping would keep every page it wrote in the process's memory);
    frames in `extra` take those labels instead (they have none in the flat file)."""
    row = np.zeros((m, 5), np.float32)
    mask = np.zeros(m, np.bool_)
    with (tmp / 'labels.flat').open('rb') as flat, (tmp / _file('labels')).open('wb') as out, \
            (tmp / _file('label_mask')).open('wb') as out_mask:
        for k, c in enumerate(counts):
            row[:] = 0
            row[:c] = extra[k] if k in extra else np.frombuffer(flat.read(c * 20), np.float32).reshape(c, 5)
            mask[:] = False
            mask[:c] = True
            out.write(row.tobytes())
            out_mask.write(mask.tobytes())
    (tmp / 'labels.flat').unlink()
