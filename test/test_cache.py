"""globloc.cache: the same training set as in memory, reused, rebuilt when stale or damaged, never half-written."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from globloc import bags as bg
from globloc import cache
from globloc import dataset as ds

SIZE = (64, 48)


def _same(a: ds.TrainData, b: ds.TrainData) -> None:
    for key in ('images', 'K', 'T_map_cam', 'depth', 'depth_full', 'labels', 'label_mask', 'seq'):
        x, y = getattr(a, key), getattr(b, key)
        assert x.shape == y.shape and x.dtype == y.dtype, key
        assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)) and torch.equal(x.isnan(), y.isnan()), key
    assert a.stats == b.stats and a.edges_source == b.edges_source and len(a.edges) == len(b.edges)
    for e, f in zip(a.edges, b.edges):
        assert (e.i, e.j, e.kind) == (f.i, f.j, f.kind) and np.allclose(e.T_i_j, f.T_i_j, atol=1e-12)
        assert np.array_equal(e.covariance, f.covariance)


def _build(bags, settings, root) -> tuple[ds.TrainData, dict | None, list[str]]:
    said = []
    data, t = cache.train_data(bags, settings, root, log=said.append)
    return data, t, said


def test_cache_holds_what_memory_holds(tiny_scene, tmp_path):
    """Cached arrays (memory-mapped) equal build_train_data's, holdout and max_frames included; a second call maps
    the same files without building."""
    bags = [tiny_scene / 'seq_00', tiny_scene / 'seq_01']
    settings = cache.CacheSettings(input_size=SIZE, label_fraction=0.005, holdout='every:3', max_frames=20)
    data, t, said = _build(bags, settings, tmp_path)
    assert t is None and len(said) == 1 and 'built 26 frames' in said[0]
    memory = ds.build_train_data(ds.load_sequences(bags, 0.005, holdout='every:3', max_frames=20), SIZE)
    _same(data, memory)
    assert isinstance(data.images.untyped_storage().data_ptr(), int) and len(data) == 26
    again, _, said = _build(bags, settings, tmp_path)
    assert said == [] and len(list(tmp_path.iterdir())) == 1
    _same(again, memory)
    assert ds.scene_normalisation(again) == ds.scene_normalisation(memory)


def test_settings_and_contents_key_the_cache(tiny_scene, tmp_path):
    """Another setting is another cache (both kept); a bag changed in place makes its cache stale: rebuilt, and
    the stale one removed. A damaged cache (a file cut short) is rebuilt."""
    bag = tmp_path / 'bag'
    shutil.copytree(tiny_scene / 'seq_00', bag)
    root = tmp_path / 'cache'
    a = cache.CacheSettings(input_size=SIZE, label_fraction=0.005)
    b = cache.CacheSettings(input_size=SIZE, label_fraction=0.005, seed=1)
    _build([bag], a, root)
    assert _build([bag], b, root)[2] and len(list(root.iterdir())) == 2
    frames = bg.read_sequence(bag, progress=False).frames[:10]
    shutil.rmtree(bag)
    bg.write_sequence(bag, frames)  # the same path, other contents
    data, _, said = _build([bag], a, root)
    assert said and len(data) == 10 and len(list(root.iterdir())) == 2  # a's stale cache gone, b's kept
    folder = root / cache.cache_key([bag], a)
    images = folder / 'images.u8'
    images.write_bytes(images.read_bytes()[:100])
    data, _, said = _build([bag], a, root)
    assert said and len(data) == 10 and data.images.shape[0] == 10


def test_a_failed_build_leaves_nothing(tiny_scene, tmp_path, monkeypatch):
    """The cache appears only complete: a build that dies half-way leaves no folder, temporary or not."""
    calls = []

    def frame_arrays(f, size, stride=8):
        calls.append(f.index)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(f, size, stride)
    real = ds.frame_arrays
    monkeypatch.setattr(ds, 'frame_arrays', frame_arrays)
    settings = cache.CacheSettings(input_size=SIZE, label_fraction=0.005)
    with pytest.raises(KeyboardInterrupt):
        cache.train_data([tiny_scene / 'seq_00'], settings, tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match='no training cache'):
        cache.train_data([tiny_scene / 'seq_00'], settings, tmp_path, build=False)


def test_cached_labels_triangulated_as_in_memory(real_bags, tmp_path):
    """A bag of images and poses only: the cache triangulates its labels over the training set as
    dataset.triangulate_labels does in memory."""
    castle = real_bags.parent / 'places' / 'strecha_castle' / 'map'
    if not castle.is_dir():
        pytest.skip(f'castle place not found at {castle}')
    settings = cache.CacheSettings(input_size=(192, 128), label_fraction=0.0025, max_frames=12)
    data, t, _ = _build([castle], settings, tmp_path)
    seqs = ds.load_sequences([castle], 0.0025, max_frames=12)
    assert t == ds.triangulate_labels(seqs, 0.0025) and t['frames_with_labels'] > 0
    _same(data, ds.build_train_data(seqs, (192, 128)))


def test_train_reuses_the_cache(tiny_scene, tmp_path, capsys):
    """`globloc train` builds the cache once; a second run and a --resume map it, and --no-cache trains the
    same weights from memory."""
    from globloc.train import train

    kw = dict(bags=[tiny_scene / 'seq_00', tiny_scene / 'seq_01'], steps=2, input_size='64x48', batch=4, threads=1,
              backbone='conv', cache=tmp_path / 'cache')
    train(out=tmp_path / 'a.pt', stop_after=1, **kw)
    assert capsys.readouterr().err.count('training cache') == 1
    train(out=tmp_path / 'a.pt', resume=True, **kw)
    train(out=tmp_path / 'b.pt', no_cache=True, **kw)
    assert 'training cache' not in capsys.readouterr().err
    a, b = (torch.load(tmp_path / n, weights_only=True)['state_dict'] for n in ('a.pt', 'b.pt'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_ranks_share_one_cache(tiny_scene, tmp_path):
    """Under torchrun, rank 0 builds the cache while rank 1 waits at a barrier, then both map it."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [str(repo / '.venv' / 'bin' / 'torchrun'), '--standalone', '--nproc-per-node', '2', '-m', 'globloc',
           'train', '--bags', str(tiny_scene / 'seq_00'), '--out', str(tmp_path / 'm.pt'), '--steps', '2',
           '--batch', '4', '--input-size', '64x48', '--backbone', 'conv', '--threads', '1',
           '--cache', str(tmp_path / 'cache')]
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, '-m', 'torch.distributed.run']
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                       timeout=180, cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count('training cache') == 1 and 'built 24 frames' in r.stderr
    assert len(list((tmp_path / 'cache').iterdir())) == 1
    assert torch.load(tmp_path / 'm.pt', weights_only=True)['meta']['world_size'] == 2
