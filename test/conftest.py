"""Shared fixtures: a tiny synthetic scene (generated once per session) and the real example bags."""
from __future__ import annotations

import atexit
import os
import random
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


# ---- the ROS tests' fixtures (test_node.py, test_launch.py, test_colcon.py; their helpers: ros_helpers.py) --
@pytest.fixture(scope='module')
def ros_env(tmp_path_factory):
    """An isolated DDS domain on localhost for this module (this process and its children)."""
    tmp = tmp_path_factory.mktemp('ros')
    env = {'ROS_DOMAIN_ID': str(random.SystemRandom().randint(10, 99)),
           'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_LOG_DIR': str(tmp / 'log'),
           'GLOBLOC_CACHE': str(tmp / 'cache'), 'PYTHONUNBUFFERED': '1'}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield tmp
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope='module')
def setup(tiny_model, ros_env) -> dict:
    """{'model': tiny_model's model file, 'bag': its scene's held-out seq_02, 'frames': that bag's frames}: what
    the node is run with and fed, and the offline Localizer compared against."""
    from globloc.bags import read_sequence

    model, scene = tiny_model
    bag = Path(scene) / 'seq_02'
    return {'model': Path(model), 'bag': bag, 'frames': read_sequence(bag, progress=False).frames}


@pytest.fixture(scope='module')
def peer(ros_env):
    """This process's rclpy node (ros_helpers.Peer) in the module's DDS domain; skips without the ROS overlay."""
    from ros_helpers import Peer, rclpy
    rclpy.init()
    p = Peer()
    yield p
    p.close()
    rclpy.try_shutdown()


# ---- no silent skips of the ROS tests ----------------------------------------------------------------------
# These need what ../shared/ros-overlay installs (ros2 launch, tf2, the rosidl generators for globloc_msgs). Where
# the overlay exists `make test` sets GLOBLOC_REQUIRE_ROS=1, and a skip among them fails the run; elsewhere one
# line at the end says what was skipped and why.
ROS_TESTS = ('test_launch.py', 'test_node.py', 'test_colcon.py', 'test_msgs.py')
_ros_skips: dict[str, set[str]] = {}  # file -> reasons


def _note_ros_skip(report) -> None:
    name = Path(report.nodeid.split('::')[0]).name
    if report.skipped and name in ROS_TESTS:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _ros_skips.setdefault(name, set()).add(reason.removeprefix('Skipped: '))


def pytest_collectreport(report):
    _note_ros_skip(report)  # a module skipped as a whole (importorskip, allow_module_level)


def pytest_runtest_logreport(report):
    _note_ros_skip(report)


def _ros_required() -> bool:
    return os.environ.get('GLOBLOC_REQUIRE_ROS') == '1'


def pytest_sessionfinish(session, exitstatus):
    if _ros_skips and _ros_required() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _ros_skips:
        what = '; '.join(f'{name}: {" / ".join(sorted(reasons))}' for name, reasons in sorted(_ros_skips.items()))
        verdict = ('FAILED: the ROS overlay is there (GLOBLOC_REQUIRE_ROS=1), so these must run' if _ros_required()
                   else 'without ../shared/ros-overlay these cannot run')
        terminalreporter.write_line(f'ROS tests skipped ({what}) - {verdict}', red=_ros_required(), bold=True)
