"""Shared fixtures: a tiny synthetic scene (generated once per session) and the real example bags."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The runtime caches ONNX graphs of .pt models; keep the tests' out of the user's ~/.cache, and remove them after.
if 'GLOBLOC_CACHE' not in os.environ:
    os.environ['GLOBLOC_CACHE'] = tempfile.mkdtemp(prefix='globloc-test-cache-')
    atexit.register(shutil.rmtree, os.environ['GLOBLOC_CACHE'], True)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(seed=0, frames=24, sequences=3, size=(160, 120), label_fraction=0.005)


@pytest.fixture(scope='session')
def tiny_scene(tmp_path_factory) -> Path:
    """Folder with seq_00, seq_01, seq_02 (24 frames each, 160x120, seed 0) and scene.json.

    Made by `globloc.synth.generate(**TINY)`; seq_02 is held out, seq_01 has changed lighting.
    Treat it as read-only: other tests share it.
    """
    from globloc import synth

    out = tmp_path_factory.mktemp('tiny_scene')
    synth.generate(out, progress=False, **TINY)
    return out


@pytest.fixture(scope='session')
def real_bags() -> Path:
    """../shared/data/bags relative to the repo root (five small real bags); skips when absent."""
    path = (REPO / '..' / 'shared' / 'data' / 'bags').resolve()
    if not path.is_dir() or not any(path.iterdir()):
        pytest.skip(f'real example bags not found at {path}')
    return path


# ---- a trained model ---------------------------------------------------------------------------------------
TINY_MODEL = dict(steps=600, batch=4, input_size='64x48', ramp='0.3:0.6', w_pose=0.2, w_rel=0.2, seed=0,
                  backbone='conv')


@pytest.fixture(scope='session')
def tiny_model(tiny_scene, tmp_path_factory) -> tuple[Path, Path]:
    """(model_path, scene_dir): a GlobLocNet trained on tiny_scene's seq_00 + seq_01 (`globloc.train.train` with
    TINY_MODEL: 600 steps at 64x48, about 25-45 s on 2 cores). Held-out seq_02 median error is a few decimetres:
    good enough to tell a working pipeline from a broken one, not an accuracy figure."""
    from globloc.train import train

    out = tmp_path_factory.mktemp('tiny_model') / 'tiny.pt'
    train(bags=[tiny_scene / 'seq_00', tiny_scene / 'seq_01'], out=out, quiet=True, threads=1, **TINY_MODEL)
    return out, tiny_scene
