"""The main job in one command (`make demo`): synthetic scene bags -> the node over real DDS -> report.

Steps: (1) generate the default synthetic scene as bags, or reuse it; (2) take the model shipped in
models/ (or, with --train, train one from the bags with the shipped model's recorded recipe);
(3) start the node with `ros2 launch globloc_ros localize.launch.py` where launch is installed,
else the `globloc-localizer` console script; (4) replay the held-out sequence over DDS while
`python -m globloc_ros.listen` records the published poses and the node's diagnostics (rclpy stays out of this
package); (5) print frames, poses published, rejected, median errors, recall, latency and frames/s, and write
plots + JSON.
The node refines each pose against a map of the training sequences (`globloc map`, built once into the scene
folder; node parameter place_map): image features and PnP, or with --depth ICP. --no-map: the one-shot poses.
With --depth the replay also publishes the recorded depth and the node uses it (RGB-D, node parameter
depth_topic) in place of the depth head, with the model trained for that (`globloc train --rgbd`).
Every child process runs in its own process group and is killed on exit, whatever happens.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from globloc.bags import Topics, read_sequence
from globloc.evaluate import plot_results, pose_metrics
from globloc_ros.placemap import MapError, load_map

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SHIPPED_MODEL = ROOT / 'models' / 'globloc_synth.pt'
SHIPPED_RGBD_MODEL = ROOT / 'models' / 'globloc_synth_rgbd.pt'  # trained with --rgbd, for depth at run time


class DemoError(RuntimeError):
    pass


def _step(msg: str) -> None:
    print(f'\n== {msg}', flush=True)


def _run(cmd: list[str], env: dict | None = None) -> None:
    print('$ ' + ' '.join(map(str, cmd)), flush=True)
    rc = subprocess.call([str(c) for c in cmd], env=env)
    if rc != 0:
        raise DemoError(f'command failed with exit code {rc}: {" ".join(map(str, cmd))}')


def ensure_scene(scene: Path, frames_per_seq: int | None) -> list[Path]:
    """The scene's bag folders (sorted; the last is held out), generating them if absent."""
    if not (scene / 'scene.json').is_file():
        _step(f'generating the synthetic scene in {scene}')
        cmd = [sys.executable, '-m', 'globloc', 'synth', '--out', scene]
        if frames_per_seq:
            cmd += ['--frames', str(frames_per_seq)]
        _run(cmd)
    else:
        _step(f'reusing the synthetic scene in {scene}')
    bags = sorted(p for p in scene.iterdir() if (p / 'metadata.yaml').is_file())
    if len(bags) < 2:
        raise DemoError(f'{scene}: expected at least 2 sequence bags, found {len(bags)}')
    return bags


def ensure_model(args, train_bags: list[Path], out: Path) -> Path:
    if not args.train:
        if not args.model.is_file():
            raise DemoError(f'model not found: {args.model} (run `make demo-train` to train one)')
        _step(f'using the shipped model {args.model}')
        return args.model
    from globloc_ros.modelfile import read_model_dict
    model = out / 'model.pt'
    recipe = _recipe(read_model_dict(args.model)['meta']) if args.model.is_file() else []
    _step(f'training a model from {len(train_bags)} bags with the shipped model\'s recipe -> {model}')
    cmd = [sys.executable, '-m', 'globloc', 'train', '--bags', *train_bags, '--out', model, '--force', *recipe]
    _run(cmd)
    return model


def ensure_map(scene: Path, train_bags: list[Path]) -> Path:
    """The map of the training sequences (scene/train.map.npz), building it if absent, unreadable or without what
    global recovery uses today (keyframes and the features each saw: a map from before version 3)."""
    path = scene / 'train.map.npz'
    try:
        current = len(load_map(path).keyframe_features_start) > 0
    except MapError:  # absent or unreadable: built below
        current = False
    if current:
        _step(f'reusing the map {path}')
    else:
        _step(f'building the map of the training sequences -> {path}')
        _run([sys.executable, '-m', 'globloc', 'map', '--bags', *train_bags, '--out', path, '--force'])
    return path


def _recipe(meta: dict) -> list[str]:
    """The shipped model's full training recipe (meta['recipe']) as `globloc train` flags."""
    flags = []
    # Flags added since a model was trained take the value that model had: no kept images, the conv backbone,
    # nothing frozen.
    recipe = {'aug_keep': 0.0, 'backbone': 'conv', 'freeze': 0, **meta.get('recipe', {})}
    for key, value in recipe.items():
        flag = '--' + key.replace('_', '-')
        if key == 'input_size':
            flags += [flag, f'{value[0]}x{value[1]}']
        elif value is True:
            flags.append(flag)
        elif value is not False and value is not None:  # (0 == False, so no `in` test)
            flags += [flag, str(value)]
    return flags


def _ensure_ament_layout() -> None:
    """`ros2 launch globloc_ros` finds the package in the venv's own prefix, which `make venv` lays out
    (globloc_ros.share.link_prefix); lay it out here if the venv was set up otherwise."""
    from globloc_ros import share
    marker = Path(sys.prefix) / 'share/ament_index/resource_index/packages' / share.PACKAGE
    if not marker.exists() and (share.SOURCE / 'ros' / share.PACKAGE).is_dir():
        share.link_prefix(Path(sys.prefix))


def start_node(model: Path, out: Path, env: dict, use_launch: bool, params_file: Path | None,
               overrides: dict[str, str]) -> subprocess.Popen:
    if use_launch:
        _ensure_ament_layout()
        cmd = [VENV_BIN / 'ros2', 'launch', 'globloc_ros', 'localize.launch.py', f'model:={model}']
        cmd += [f'params_file:={params_file}'] if params_file else []
        cmd += [f'{k}:={v}' for k, v in overrides.items()]
    else:
        cmd = [VENV_BIN / 'globloc-localizer', '--ros-args', '-p', f'model:={model}']
        cmd += ['--params-file', params_file] if params_file else []
        cmd += [a for k, v in overrides.items() for a in ('-p', f'{k}:={v}')]
    print('$ ' + ' '.join(map(str, cmd)), flush=True)
    log = open(out / 'node.log', 'w')
    return subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


class Collector:
    """The poses and the last diagnostics the node publishes, as `python -m globloc_ros.listen` (an rclpy process:
    this package never imports rclpy) writes them to out/received.jsonl; poll() reads what came since."""

    def __init__(self, out: Path, env: dict):
        self.path = out / 'received.jsonl'
        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, '-m', 'globloc_ros.listen', str(self.path)], env=env,
                                     start_new_session=True)
        self.poses: dict[int, np.ndarray] = {}
        self.received_at: dict[int, float] = {}
        self.diagnostics: dict[str, str] = {}
        self.ready = False
        self._read = 0  # bytes of the file taken so far (whole lines only)

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, 'rb') as f:
            f.seek(self._read)
            data = f.read()
        lines = data[:data.rfind(b'\n') + 1]
        self._read += len(lines)
        for line in lines.decode().splitlines():
            record = json.loads(line)
            if 'stamp_ns' in record:
                self.poses[record['stamp_ns']] = np.array(record['T_map_cam']).reshape(4, 4)
                self.received_at[record['stamp_ns']] = record['t']
            elif 'diagnostics' in record:
                self.diagnostics = record['diagnostics']
            self.ready |= bool(record.get('ready'))

    def close(self) -> None:
        _kill(self.proc)


def _pose_rate(received_at: list[float]) -> float | None:
    """Poses per second between the first and the last pose received."""
    if len(received_at) < 2:
        return None
    return round((len(received_at) - 1) / (max(received_at) - min(received_at)), 1)


def report(gt: dict[int, np.ndarray], collector: Collector, out: Path) -> dict:
    """Errors of the received poses against ground truth; frames without a pose count as failures."""
    stamps = sorted(gt)
    T_gt = np.stack([gt[s] for s in stamps])
    ok = np.array([s in collector.poses for s in stamps])
    T_est = np.stack([collector.poses.get(s, np.full((4, 4), np.nan)) for s in stamps])
    summary = pose_metrics(T_est, T_gt, ok)[0]
    diag = collector.diagnostics
    summary.update({
        'frames': len(stamps), 'poses_published': int(ok.sum()),
        'rejected': diag.get('frames_rejected'), 'dropped': diag.get('frames_dropped'),
        # replayed images carry their recorded stamps, so latency is measured from the node's receipt
        'latency_p50_ms': diag.get('latency_receive_to_publish_p50_ms'),
        'latency_p99_ms': diag.get('latency_receive_to_publish_p99_ms'),
        'localize_p50_ms': diag.get('localize_p50_ms'), 'localize_p99_ms': diag.get('localize_p99_ms'),
        'backend': diag.get('backend'), 'frames_with_depth': diag.get('frames_with_depth'),
        **{f'frames_{p}': diag.get(f'frames_{p}') for p in ('refined', 'tracked', 'recovered')},
        'frames_per_s': _pose_rate(list(collector.received_at.values())),
        'diagnostics': diag,
    })
    plots = plot_results(T_gt, T_est, out, ok=ok, title='globloc demo: held-out sequence through the ROS 2 node')
    summary['plots'] = [str(p) for p in plots.values()]
    (out / 'demo_report.json').write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='globloc.demo', description=__doc__.splitlines()[0])
    parser.add_argument('--scene', type=Path, default=ROOT / 'data' / 'scene')
    parser.add_argument('--model', type=Path, default=None,
                        help='default models/globloc_synth.pt (models/globloc_synth_rgbd.pt with --depth)')
    parser.add_argument('--out', type=Path, default=None, help='default out/demo (out/demo-rgbd with --depth)')
    parser.add_argument('--train', action='store_true', help='train the model from the bags first')
    parser.add_argument('--frames', type=int, default=None, help='frames per sequence for a new scene')
    parser.add_argument('--rate', type=float, default=30.0, help='replay rate, frames/s')
    parser.add_argument('--params-file', type=Path, default=None,
                        help='node parameters (default: the package config/localizer.yaml)')
    parser.add_argument('--no-launch', action='store_true', help='start the console script, not ros2 launch')
    parser.add_argument('--depth', action='store_true',
                        help='RGB-D: replay the recorded depth too; the node uses it in place of the depth head')
    parser.add_argument('--no-map', action='store_true', help='publish the one-shot poses, not refined against a map')
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / 'out' / ('demo-rgbd' if args.depth else 'demo')
    args.model = args.model or (SHIPPED_RGBD_MODEL if args.depth else SHIPPED_MODEL)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    node = replay = collector = None
    try:
        bags = ensure_scene(args.scene, args.frames)
        model = ensure_model(args, bags[:-1], args.out).resolve()

        _step(f'reading ground truth of the held-out sequence {bags[-1].name}')
        held_out = read_sequence(bags[-1], seq=len(bags) - 1, progress=True)
        gt = {f.stamp_ns: f.T_map_cam for f in held_out.frames}

        env = dict(os.environ, ROS_DOMAIN_ID=os.environ.get('ROS_DOMAIN_ID', str(random.randint(1, 200))),
                   ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
        os.environ.update({k: env[k] for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')})
        overrides = {'depth_topic': Topics.depth} if args.depth else {}
        if not args.no_map:
            overrides['place_map'] = str(ensure_map(args.scene, bags[:-1]).resolve())
        use_launch = not args.no_launch and (VENV_BIN / 'ros2').exists() and _has_launch()
        _step('starting the node with ' + ('ros2 launch' if use_launch else 'the globloc-localizer console script'))
        node = start_node(model, args.out, env, use_launch, args.params_file, overrides)
        collector = Collector(args.out, env)
        _wait_for_node(collector, node, args.out / 'node.log')

        _step(f'replaying {bags[-1].name} ({len(gt)} frames) at {args.rate:g} frames/s')
        replay = subprocess.Popen([str(VENV_BIN / 'globloc-replay'), str(bags[-1]), '--rate-hz', str(args.rate)],
                                  env=env, start_new_session=True)
        _progress_until_done(replay, collector, len(gt))
        time.sleep(1.0)  # the last frames are still in flight
        collector.poll()
        if replay.returncode != 0:
            raise DemoError(f'replay failed with exit code {replay.returncode}')
        if node.poll() is not None:
            raise DemoError(f'the node exited early with code {node.returncode}; see {args.out / "node.log"}')

        summary = report(gt, collector, args.out)
        _print_summary(summary, args.out, time.monotonic() - t_start, args.rate, args.depth)
        if summary['poses_published'] == 0:
            raise DemoError('the node published no pose')
        return 0
    except DemoError as e:
        print(f'\ndemo failed: {e}', file=sys.stderr)
        return 1
    finally:
        _kill(replay)
        _kill(node)
        if collector is not None:
            collector.close()


def _has_launch() -> bool:
    """Whether launch_ros (from the ros-overlay; optional) is installed."""
    return importlib.util.find_spec('launch_ros') is not None


def _wait_for_node(collector: Collector, node: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise DemoError(f'the node exited at start (code {node.returncode}):\n{log.read_text()[-2000:]}')
        if collector.proc.poll() is not None:
            raise DemoError(f'the listener (python -m globloc_ros.listen) exited with code {collector.proc.returncode}')
        collector.poll()
        if collector.ready:
            return
        time.sleep(0.2)
    raise DemoError(f'the node did not come up within {timeout_s:.0f} s; see {log}')


def _progress_until_done(replay: subprocess.Popen, collector: Collector, total: int) -> None:
    from tqdm import tqdm
    with tqdm(total=total, desc='poses received', unit='frame') as bar:
        while replay.poll() is None:
            collector.poll()
            bar.update(len(collector.poses) - bar.n)
            time.sleep(0.5)
        collector.poll()
        bar.update(len(collector.poses) - bar.n)


def _print_summary(s: dict, out: Path, wall_s: float, rate: float, depth: bool = False) -> None:
    def fmt(v, spec):
        return format(float(v), spec) if v not in (None, '') else 'n/a'
    print('\n== globloc demo: held-out sequence through the ROS 2 node' + (' (RGB-D)' if depth else ''))
    rows = [
        ('frames', s['frames']), ('poses published', s['poses_published']),
        *([('localized with their depth image', s.get('frames_with_depth'))] if depth else []),
        *([('refined near the one-shot pose', s.get('frames_refined')),
           ('tracked from the last pose', s.get('frames_tracked')),
           ('recovered by searching the map', s.get('frames_recovered'))]
          if s.get('frames_refined') is not None else []),
        ('rejected (not confident / not verified)', s.get('rejected')), ('dropped (node busy)', s.get('dropped')),
        ('median translation error', fmt(s['median_translation_m'] * 100, '.2f') + ' cm'),
        ('median rotation error', fmt(s['median_rotation_deg'], '.2f') + ' deg'),
        ('recall (5 cm, 5 deg)', fmt(s['recall_5cm_5deg'] * 100, '.1f') + ' %'),
        ('recall (10 cm, 10 deg)', fmt(s['recall_10cm_10deg'] * 100, '.1f') + ' %'),
        ('latency p50 / p99 (image in -> pose out)', f"{fmt(s.get('latency_p50_ms'), '.1f')} / {fmt(s.get('latency_p99_ms'), '.1f')} ms"),
        (f"localizer alone p50 / p99 ({s.get('backend')})",
         f"{fmt(s.get('localize_p50_ms'), '.1f')} / {fmt(s.get('localize_p99_ms'), '.1f')} ms"),
        (f"poses per second (replayed at {rate:g} frames/s)", s.get('frames_per_s')),
    ]
    for k, v in rows:
        print(f'  {k:<42} {v}')
    print(f'  plots: {", ".join(s["plots"])}')
    print(f'  report: {out / "demo_report.json"}   (demo wall time {wall_s:.0f} s)')


if __name__ == '__main__':
    sys.exit(main())
