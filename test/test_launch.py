"""`ros2 launch globloc_ros localize.launch.py` for real: the package is pip-installed into a temporary
prefix (as a user or colcon would install it, data_files included), found through AMENT_PREFIX_PATH,
launched, fed a bag by globloc-replay, and this process receives the poses over DDS."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip('launch_ros', reason='launch/launch_ros come from the ROS overlay (shared/ros-overlay)')
ROS2 = Path(sys.executable).parent / 'ros2'
if not ROS2.exists():
    pytest.skip(f'the ros2 CLI is not installed ({ROS2})', allow_module_level=True)

from test_node import peer, ros_env, setup  # noqa: E402,F401  (fixtures shared with the node tests)

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ('setup.py', 'package.xml', 'resource', 'launch', 'config', 'models', 'scripts', 'globloc',
                 'globloc_ros')


@pytest.fixture(scope='module')
def prefix(tmp_path_factory, ros_env) -> dict:
    """Install the package non-editable into a fresh prefix; returns the environment that finds it.
    The sources are copied first so that the build leaves nothing in the shared checkout."""
    tmp = tmp_path_factory.mktemp('install')
    src, prefix = tmp / 'src', tmp / 'prefix'
    src.mkdir()
    for name in PACKAGE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        elif path.exists():
            shutil.copy2(path, src / name)
    env = dict(os.environ, _ROS_WHEELS_BOOTSTRAP_COMPLETE='1')  # pip needs no ROS libraries: skip the re-exec
    # --ignore-installed: without it pip *uninstalls* the venv's editable globloc_ros before installing
    # into the prefix, which would break every other test and console script.
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', '--no-deps',
                    '--no-build-isolation', '--ignore-installed', '--prefix', str(prefix), str(src)],
                   env=env, check=True, timeout=300)
    site = prefix / 'lib' / 'python3.11' / 'site-packages'
    env = dict(os.environ, AMENT_PREFIX_PATH=str(prefix),
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get('PYTHONPATH')])]))
    assert (prefix / 'share' / 'globloc_ros' / 'launch' / 'localize.launch.py').is_file()
    assert (prefix / 'lib' / 'globloc_ros' / 'localizer').is_file()
    return {'prefix': prefix, 'env': env}


def test_launch_file_declares_its_arguments(prefix):
    run = subprocess.run([str(ROS2), 'launch', 'globloc_ros', 'localize.launch.py', '--show-args'],
                         env=prefix['env'], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for arg in ('model', 'params_file', 'namespace', 'image_topic', 'camera_info_topic', 'backend', 'publish_tf',
                'use_rviz'):
        assert f"'{arg}'" in run.stdout
    assert str(prefix['prefix'] / 'share' / 'globloc_ros' / 'config' / 'localizer.yaml') in run.stdout


def test_ros2_launch_localizes_a_replayed_bag(prefix, peer, setup, tmp_path):
    # A params file like a user's: the installed defaults, with gating opened for the untrained model.
    params = yaml.safe_load((prefix['prefix'] / 'share/globloc_ros/config/localizer.yaml').read_text())
    params['/**']['ros__parameters'].update(max_residual_m=1e6, min_effective_points=0.0, diagnostics_period=0.2)
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    log = open(tmp_path / 'launch.log', 'w')
    launch = subprocess.Popen([str(ROS2), 'launch', 'globloc_ros', 'localize.launch.py', f'model:={setup["model"]}',
                               f'params_file:={params_file}', 'publish_tf:=map_to_camera'],
                              env=prefix['env'], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        peer.reset()
        assert peer.wait(lambda: peer.n_diag > 0 or launch.poll() is not None, 60) and launch.poll() is None, \
            (tmp_path / 'launch.log').read_text()
        replay = subprocess.run([str(prefix['prefix'] / 'bin' / 'globloc-replay'), str(setup['bag']),
                                 '--rate-hz', '20'], env=prefix['env'], capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        stamps = {f.stamp_ns for f in setup['frames']}
        assert peer.wait(lambda: len(peer.poses) >= len(stamps) - 2, 20), \
            f'{len(peer.poses)} poses of {len(stamps)}:\n' + (tmp_path / 'launch.log').read_text()
        assert set(peer.poses) <= stamps  # stamped with the recorded image stamps
        assert all(p.header.frame_id == 'map' for p in peer.poses.values())
        diag = peer.fresh_diag()
        assert diag['model'] == str(setup['model'])
        assert diag['backend'] in ('onnxruntime', 'torch')
        assert launch.poll() is None
        # launch_ros ran the installed executable lib/globloc_ros/localizer, with the launch's params files.
        children = [_cmdline(pid) for pid in _children(launch.pid)]
        exe = f"{prefix['prefix']}/lib/globloc_ros/localizer"
        node_cmd = next((c for c in children if exe in c[:2]), None)  # [python3,] exe, --ros-args ...
        assert node_cmd is not None, children
        assert str(params_file) in node_cmd
    finally:
        code = _stop(launch)
        log.close()
    out = (tmp_path / 'launch.log').read_text()
    assert 'process has finished cleanly' in out and code == 0, out


def test_ros2_launch_with_a_missing_model_stops_with_the_reason(prefix, tmp_path):
    run = subprocess.run([str(ROS2), 'launch', 'globloc_ros', 'localize.launch.py',
                          f'model:={tmp_path / "missing.pt"}'], env=prefix['env'], capture_output=True, text=True,
                         timeout=60)
    out = run.stdout + run.stderr
    assert f"parameter 'model': file not found: {tmp_path / 'missing.pt'}" in out
    assert 'exit code 2' in out  # the node failed, and the launch shut down instead of hanging
    assert run.returncode == 1, out  # and `ros2 launch` says so to scripts


def _stop(proc: subprocess.Popen) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig) if sig != signal.SIGINT else proc.send_signal(sig)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever launch left behind in its session
    except ProcessLookupError:
        pass
    return proc.returncode


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().decode().split('\0')[:-1]
    except OSError:
        return []
