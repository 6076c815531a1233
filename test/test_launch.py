"""`ros2 launch globloc_ros localize.launch.py` and `ros2 run globloc_ros localizer` as a user types them in the venv
that `make` sets up: the package is found in the venv's own prefix (share/globloc_ros and lib/globloc_ros are links
into this checkout, laid out by `make venv` with globloc_ros.share.link_prefix), launched, fed a bag by
globloc-replay, and this process receives the poses over DDS."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip('launch_ros', reason='launch/launch_ros come from the ROS overlay (shared/ros-overlay)')
BIN = Path(sys.executable).parent
ROS2 = BIN / 'ros2'
if not ROS2.exists():
    pytest.skip(f'the ros2 CLI is not installed ({ROS2})', allow_module_level=True)

from ros_helpers import child_pids, cmdline, stop_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREFIX = Path(sys.prefix)  # the venv
SHARE = PREFIX / 'share' / 'globloc_ros'


@pytest.fixture(scope='module')
def env(ros_env) -> dict:
    """A shell with the venv activated: `source .venv/bin/activate` puts the venv on PATH and in AMENT_PREFIX_PATH
    (set here alone, so that no workspace sourced by whoever runs the tests is tested instead)."""
    return dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get('PATH', '')]),
                AMENT_PREFIX_PATH=str(PREFIX), VIRTUAL_ENV=str(PREFIX))


def test_the_package_is_in_the_venv_prefix_as_links_into_the_checkout(env):
    run = subprocess.run([str(ROS2), 'pkg', 'prefix', 'globloc_ros'], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == str(PREFIX), \
        run.stdout + run.stderr + '\n(`make venv` lays the package out in the venv: python -m globloc_ros.share .venv)'
    run = subprocess.run([str(ROS2), 'pkg', 'executables', 'globloc_ros'], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.split('\n')[:3] == ['globloc_ros globloc', 'globloc_ros localizer', 'globloc_ros replay'], \
        run.stdout + run.stderr
    # Links, so that an edit in the checkout is what runs next time (colcon's --symlink-install does the same).
    assert (SHARE / 'launch' / 'localize.launch.py').resolve() == REPO / 'launch' / 'localize.launch.py'
    assert (SHARE / 'config' / 'localizer.yaml').resolve() == REPO / 'config' / 'localizer.yaml'
    assert (SHARE / 'package.xml').resolve() == REPO / 'ros' / 'globloc_ros' / 'package.xml'
    assert (PREFIX / 'lib' / 'globloc_ros' / 'localizer').resolve() == (BIN / 'globloc-localizer').resolve()
    import globloc_ros
    assert Path(globloc_ros.__file__).resolve().parent == REPO / 'globloc_ros'  # the editable install
    # No generic names in the venv's bin/: localizer and replay are lib/globloc_ros's.
    assert not (BIN / 'localizer').exists() and not (BIN / 'replay').exists()
    assert all((BIN / name).exists() for name in ('globloc', 'globloc-localizer', 'globloc-replay'))


def test_launch_file_declares_its_arguments(env):
    run = subprocess.run([str(ROS2), 'launch', 'globloc_ros', 'localize.launch.py', '--show-args'],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for arg in ('model', 'params_file', 'namespace', 'image_topic', 'camera_info_topic', 'backend', 'publish_tf',
                'use_rviz'):
        assert f"'{arg}'" in run.stdout
    assert str(SHARE / 'config' / 'localizer.yaml') in run.stdout


def test_ros2_launch_localizes_a_replayed_bag(env, peer, setup, tmp_path):
    # A params file like a user's: the installed defaults, with gating opened for the untrained model.
    params = yaml.safe_load((SHARE / 'config' / 'localizer.yaml').read_text())
    params['/**']['ros__parameters'].update(max_residual_m=1e6, min_effective_points=0.0, diagnostics_period=0.2)
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    log = open(tmp_path / 'launch.log', 'w')
    launch = subprocess.Popen([str(ROS2), 'launch', 'globloc_ros', 'localize.launch.py', f'model:={setup["model"]}',
                               f'params_file:={params_file}', 'publish_tf:=map_to_camera',
                               'use_rviz:=true'],  # rviz2 is not in the venv's prefix: the launch goes on without
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        peer.reset()
        assert peer.wait(lambda: peer.n_diag > 0 or launch.poll() is not None, 60) and launch.poll() is None, \
            (tmp_path / 'launch.log').read_text()
        replay = subprocess.run([str(BIN / 'globloc-replay'), str(setup['bag']), '--rate-hz', '20'], env=env,
                                capture_output=True, text=True, timeout=60)
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
        # launch_ros ran the venv's lib/globloc_ros/localizer, with the launch's params files.
        children = [cmdline(pid) for pid in child_pids(launch.pid)]
        exe = f'{PREFIX}/lib/globloc_ros/localizer'
        node_cmd = next((c for c in children if exe in c[:2]), None)  # [python3,] exe, --ros-args ...
        assert node_cmd is not None, children
        assert str(params_file) in node_cmd
    finally:
        code = stop_process(launch)
        log.close()
    out = (tmp_path / 'launch.log').read_text()
    assert 'process has finished cleanly' in out and code == 0, out
    assert "use_rviz: rviz2 is not installed (no package 'rviz2'): running without RViz" in out


def test_ros2_launch_with_a_missing_model_stops_with_the_reason(env, tmp_path):
    run = subprocess.run([str(ROS2), 'launch', 'globloc_ros', 'localize.launch.py',
                          f'model:={tmp_path / "missing.pt"}'], env=env, capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert f"parameter 'model': file not found: {tmp_path / 'missing.pt'}" in out
    assert 'exit code 2' in out  # the node failed, and the launch shut down instead of hanging
    assert run.returncode == 1, out  # and `ros2 launch` says so to scripts


def test_ros2_run_localizer(env, peer, setup, tmp_path):
    log = open(tmp_path / 'run.log', 'w')
    # ros2run's verb in a ROS 2 install; in the venv, its own (ros/ros2cli_venv: `make venv` installs it there)
    cmd = [str(ROS2), 'run', 'globloc_ros', 'localizer', '--ros-args', '-p', f'model:={setup["model"]}',
           '-p', 'diagnostics_period:=0.2']
    node = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        peer.reset()
        assert peer.wait(lambda: peer.n_diag > 0 or node.poll() is not None, 60) and node.poll() is None, \
            (tmp_path / 'run.log').read_text()
        assert peer.fresh_diag()['model'] == str(setup['model'])
    finally:
        code = stop_process(node)
        log.close()
    assert code == 0, f'{cmd}: exit code {code}\n' + (tmp_path / 'run.log').read_text()
