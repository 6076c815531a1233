"""The colcon path as a ROS user types it: this repository in a workspace's src/, `colcon build --symlink-install`
(the venv's colcon, rosidl and ament wheels), `source install/setup.bash`, then
`ros2 launch globloc_ros localize.launch.py model:=...`; the workspace's localizer publishes diagnostics and poses
to this process over DDS.

colcon stops descending at the first folder it identifies as a package, so the repository root is none: it finds
ros/globloc_msgs (ament_cmake, rosidl) and ros/globloc_ros (ament_python, whose sources are links to the root)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip('launch_ros', reason='launch/launch_ros come from the ROS overlay (shared/ros-overlay)')
BIN = Path(sys.executable).parent
if not (BIN / 'colcon').exists():
    pytest.skip(f'colcon is not installed ({BIN / "colcon"}; requirements-dev.txt has it)', allow_module_level=True)

from ros_helpers import child_pids, cmdline, stop_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# What a clone has, less what is built or generated in this checkout.
NOT_COPIED = {'.git', '.venv', 'build', 'install', 'log', 'out', 'data', '.ros-log', '.pytest_cache', '.dev'}


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == REPO
    return {n for n in names if (top and n in NOT_COPIED) or n == '__pycache__' or n.endswith('.egg-info')}


@pytest.fixture(scope='module')
def workspace(tmp_path_factory, ros_env) -> dict:
    """A colcon workspace with a copy of this repository in src/, built with `colcon build --symlink-install` in a
    shell with the venv activated. Returns the workspace and that shell's environment."""
    ws = tmp_path_factory.mktemp('ws')
    shutil.copytree(REPO, ws / 'src' / 'globloc_ros', symlinks=True, ignore=_copy_ignore)
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get('PATH', '')]),
               AMENT_PREFIX_PATH=sys.prefix, VIRTUAL_ENV=sys.prefix, COLCON_HOME=str(ws / '.colcon'))
    env.pop('PYTHONPATH', None)
    listed = subprocess.run([str(BIN / 'colcon'), 'list'], cwd=ws, env=env, capture_output=True, text=True,
                            timeout=120)
    build = subprocess.run([str(BIN / 'colcon'), 'build', '--symlink-install'], cwd=ws, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return {'ws': ws, 'env': env, 'list': listed.stdout, 'build': build.stdout}


def sourced(ws: Path, command: str) -> list[str]:
    """`source install/setup.bash && COMMAND` in the workspace."""
    return ['bash', '-c', f'cd {ws} && source install/setup.bash && {command}']


def test_colcon_finds_and_builds_both_packages(workspace):
    rows = {line.split('\t')[0]: line.split('\t')[1:] for line in workspace['list'].splitlines()}
    assert rows['globloc_msgs'] == ['src/globloc_ros/ros/globloc_msgs', '(ros.ament_cmake)'], workspace['list']
    assert rows['globloc_ros'] == ['src/globloc_ros/ros/globloc_ros', '(ros.ament_python)'], workspace['list']
    assert 'Summary: 2 packages finished' in workspace['build'], workspace['build']


def test_the_install_is_a_symlink_install_with_the_venv_layout(workspace):
    ws, install = workspace['ws'], workspace['ws'] / 'install'
    src = ws / 'src' / 'globloc_ros'
    share = install / 'globloc_ros' / 'share' / 'globloc_ros'
    # Installed files are links into src/: an edit there is what runs next time, without a rebuild.
    assert (share / 'launch' / 'localize.launch.py').resolve() == src / 'launch' / 'localize.launch.py'
    assert (share / 'config' / 'localizer.yaml').resolve() == src / 'config' / 'localizer.yaml'
    run = subprocess.run(sourced(ws, 'python -c "import globloc_ros.node, globloc_msgs.msg as m; '
                                     'print(globloc_ros.node.__file__); print(m.__file__)"'),
                         env=workspace['env'], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    node_file, msgs_file = run.stdout.split()
    assert Path(node_file).resolve() == src / 'globloc_ros' / 'node.py'
    assert Path(msgs_file).is_relative_to(install / 'globloc_msgs')
    # The executables are the ament_python kind (setup.cfg), and the venv's layout (make venv:
    # globloc_ros.share.link_prefix) holds the same files as colcon's install.
    lib = install / 'globloc_ros' / 'lib' / 'globloc_ros'
    assert {'localizer', 'replay', 'globloc'} <= {p.name for p in lib.iterdir()}
    venv_share = Path(sys.prefix) / 'share' / 'globloc_ros'

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for d in ('launch', 'config', 'models') for p in (root / d).iterdir()}
    assert files(venv_share) == files(share)
    assert {p.name for p in (Path(sys.prefix) / 'lib' / 'globloc_ros').iterdir()} <= {p.name for p in lib.iterdir()}


def test_ros2_launch_from_the_workspace_localizes_a_replayed_bag(workspace, peer, setup, tmp_path):
    ws, env = workspace['ws'], workspace['env']
    run = subprocess.run(sourced(ws, 'ros2 pkg prefix globloc_ros && ros2 pkg prefix globloc_msgs'), env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == [str(ws / 'install' / 'globloc_ros'), str(ws / 'install' / 'globloc_msgs')], \
        run.stdout + run.stderr
    params = yaml.safe_load((ws / 'install/globloc_ros/share/globloc_ros/config/localizer.yaml').read_text())
    params['/**']['ros__parameters'].update(max_residual_m=1e6, min_effective_points=0.0, diagnostics_period=0.2)
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    log = open(tmp_path / 'launch.log', 'w')
    launch = subprocess.Popen(sourced(ws, f'exec ros2 launch globloc_ros localize.launch.py model:={setup["model"]} '
                                          f'params_file:={params_file}'),
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        peer.reset()
        assert peer.wait(lambda: peer.n_diag > 0 or launch.poll() is not None, 60) and launch.poll() is None, \
            (tmp_path / 'launch.log').read_text()
        children = [cmdline(pid) for pid in child_pids(launch.pid)]
        exe = f'{ws}/install/globloc_ros/lib/globloc_ros/localizer'
        assert any(exe in c[:2] for c in children), children  # the workspace's executable, not the venv's
        # the workspace's replay (what `ros2 run globloc_ros replay` runs)
        replay = subprocess.run(sourced(ws, f'install/globloc_ros/lib/globloc_ros/replay {setup["bag"]} --rate-hz 20'),
                                env=env, capture_output=True, text=True, timeout=90)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        stamps = {f.stamp_ns for f in setup['frames']}
        assert peer.wait(lambda: len(peer.poses) >= len(stamps) - 2, 20), \
            f'{len(peer.poses)} poses of {len(stamps)}:\n' + (tmp_path / 'launch.log').read_text()
        assert set(peer.poses) <= stamps
        assert peer.fresh_diag()['model'] == str(setup['model'])
    finally:
        code = stop_process(launch)
        log.close()
    out = (tmp_path / 'launch.log').read_text()
    assert 'process has finished cleanly' in out and code == 0, out
