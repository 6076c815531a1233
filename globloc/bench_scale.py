"""`globloc bench-scale`: peak memory and time of each command against the length of a recording.

    globloc bench-scale --frames 600 2400 --json docs/scaling.json --plot docs/scaling.png

For each length N it writes (once, kept in --work) a synthetic 640x480 RGB-D scene of two N-frame sequences
(`globloc synth --size 640x480 --sequences 2 --frames N`), then runs each command on its first sequence, seq_00, in
a subprocess and reports the subprocess's peak RSS (os.wait4), its wall and CPU time and frames per second:

- info:    `globloc info BAG`
- train:   `globloc train --bags BAG --steps S --threads 1` with an empty training cache (it decodes the bag);
  frames/s is the bag's frames over the wall time, and the cache's own build rate is printed beside it
- train (cached): the same again, the cache built (S steps over the wall time in steps/s)
- map:     `globloc map --bags BAG`
- eval:    `globloc eval` of the model just trained on the first E frames of the same bag (what is measured is
  memory and time, not accuracy)
- replay:  `globloc-replay BAG --fast` (camera topics, no subscriber)

--source runs another checkout's code (e.g. the commit before a change) with the same harness: its commands run
with PYTHONPATH=SOURCE from inside it. --compare overlays an earlier --json on the plot (dashed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from globloc import imagenet

COMMANDS = ('info', 'train', 'train (cached)', 'map', 'eval', 'replay')
REPLAY_TOPICS = ('/camera/image_raw', '/camera/camera_info', '/camera/depth/image_raw')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--frames', type=int, nargs='+', default=[600, 2400],
                   help='frames per recording (default 600 2400; 20000: 56 GB of bags, 80 min to synthesise and '
                        '40 min of commands on 2 cores)')
    p.add_argument('--size', default='640x480', help='image size WxH (default 640x480)')
    p.add_argument('--work', default='/tmp/globloc-scale', help='folder for the scenes, models, maps and caches')
    p.add_argument('--commands', nargs='+', default=list(COMMANDS), choices=COMMANDS, metavar='CMD',
                   help=f'commands to run (default all: {", ".join(COMMANDS)})')
    p.add_argument('--steps', type=int, default=20, help='training steps (default 20)')
    p.add_argument('--eval-frames', type=int, default=200, help='frames eval scores (default 200)')
    p.add_argument('--source', default=None, help='run the commands from this checkout (default: this one)')
    p.add_argument('--json', default=None, help='write the figures here')
    p.add_argument('--plot', default=None, help='write the plot here (PNG)')
    p.add_argument('--compare', default=None, help='an earlier --json to draw beside these (dashed)')
    p.add_argument('--from-json', nargs='+', default=None, metavar='JSON',
                   help='run nothing: table and plot of the rows of these --json files together')


def measure(argv: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run argv; its peak RSS (GB, os.wait4: the child and the children it waited for), wall time and CPU time
    (user + system, s: on a shared machine the wall time also counts the others' load)."""
    t0 = time.perf_counter()
    with log.open('w') as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f'{" ".join(argv)} failed ({proc.returncode}); see {log}:\n'
                           + '\n'.join(log.read_text().splitlines()[-5:]))
    return {'peak_rss_gb': round(usage.ru_maxrss / 2**20, 3), 'wall_s': round(wall, 2),
            'cpu_s': round(usage.ru_utime + usage.ru_stime, 2)}


def scene(work: Path, frames: int, size: str, cwd: Path, env: dict) -> Path:
    """The synthetic scene of `frames` frames per sequence, written once (its seq_00 is what the commands read)."""
    from rosbags.rosbag2 import Reader

    out = work / f'synth_{size}_f{frames}'
    try:
        with Reader(out / 'seq_00') as reader:
            if sum(c.msgcount for c in reader.connections if c.topic == '/camera/image_raw') == frames:
                return out
    except Exception:  # noqa: BLE001 - missing or unfinished: write it
        pass
    print(f'writing {out} ({2 * frames} frames; about {2 * frames / 4 / 60:.0f} min)', file=sys.stderr, flush=True)
    subprocess.run([sys.executable, '-m', 'globloc', 'synth', '--out', str(out), '--frames', str(frames),
                    '--sequences', '2', '--size', size, '--force'], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def run_one(name: str, n: int, bags: Path, work: Path, a: argparse.Namespace, cwd: Path, env: dict) -> dict:
    py = [sys.executable, '-m', 'globloc']
    bag = str(bags / 'seq_00')
    model = work / f'model_f{n}.pt'
    logs = work / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f'{name.replace(" ", "_").replace("(", "").replace(")", "")}_f{n}.log'
    train = [*py, 'train', '--bags', bag, '--out', str(model), '--steps', str(a.steps), '--threads', '1',
             '--force']
    if name == 'info':
        argv = [*py, 'info', bag]
    elif name == 'train':
        cache = Path(env['GLOBLOC_CACHE']) / 'train'
        if cache.exists():
            subprocess.run(['rm', '-rf', str(cache)], check=True)
        argv = train
    elif name == 'train (cached)':
        argv = train
    elif name == 'map':
        argv = [*py, 'map', '--bags', bag, '--out', str(work / f'map_f{n}.npz'), '--force']
    elif name == 'eval':
        if not model.exists():
            raise RuntimeError(f'eval needs the model that train writes ({model}): run train first')
        argv = [*py, 'eval', '--model', str(model), '--bags', bag, '--max-frames', str(a.eval_frames),
                '--threads', '1']
    else:
        argv = [sys.executable, '-m', 'globloc_ros.replay', bag, '--fast', '--wait', '0', '--topics', *REPLAY_TOPICS]
    row = {'command': name, 'frames': n, **measure(argv, cwd, env, log)}
    units = a.eval_frames if name == 'eval' else n
    row['frames_per_s'] = round(units / row['wall_s'], 1)
    if name == 'train (cached)':
        row['steps_per_s'] = round(a.steps / row['wall_s'], 2)
    built = re.search(r'built (\d+) frames in ([\d.]+) s.*?([\d.]+) s CPU', log.read_text())
    if built:
        row['cache_frames_per_s'] = round(int(built[1]) / max(float(built[2]), 1e-9), 1)
        row['cache_frames_per_cpu_s'] = round(int(built[1]) / max(float(built[3]), 1e-9), 1)
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one row per command and length."""
    out = ['| command | frames | peak RSS (GB) | wall (s) | CPU (s) | frames/s | note |',
           '|---|---|---|---|---|---|---|']
    for r in rows:
        note = []
        if 'cache_frames_per_s' in r:
            note.append(f'cache built at {r["cache_frames_per_s"]:.0f} frames/s'
                        + (f' ({r["cache_frames_per_cpu_s"]:.0f} per CPU second)' if 'cache_frames_per_cpu_s' in r
                           else ''))
        if 'steps_per_s' in r:
            note.append(f'{r["steps_per_s"]:.2f} steps/s')
        cpu = f'{r["cpu_s"]:.1f}' if 'cpu_s' in r else ''
        out.append(f'| {r["command"]} | {r["frames"]} | {r["peak_rss_gb"]:.2f} | {r["wall_s"]:.1f} | {cpu} | '
                   f'{r["frames_per_s"]:.1f} | {"; ".join(note)} |')
    return '\n'.join(out)


def plot(rows: list[dict], path: Path, before: list[dict] | None = None) -> None:
    """Peak RSS and wall time against frames, one line per command (an earlier run dashed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = dict(zip(COMMANDS, plt.rcParams['axes.prop_cycle'].by_key()['color']))
    for runs, style, tag in ((before or [], '--', ' (before)'), (rows, '-', '')):
        for name in COMMANDS:
            mine = sorted((r for r in runs if r['command'] == name), key=lambda r: r['frames'])
            if not mine:
                continue
            x = [r['frames'] for r in mine]
            for ax, key in zip(axes, ('peak_rss_gb', 'wall_s')):
                ax.plot(x, [r[key] for r in mine], style, marker='o', color=colours[name], label=name + tag)
    axes[0].set(xlabel='frames in the recording', ylabel='peak RSS (GB)', title='memory')
    axes[1].set(xlabel='frames in the recording', ylabel='wall time (s)', title='time')
    frames = [r['frames'] for r in [*rows, *(before or [])]]
    wide = max(frames) > 10 * min(frames)  # 600 ... 20,000 frames: a log axis keeps the short runs apart
    for ax in axes:
        ax.grid(alpha=0.3)
        if wide:
            ax.set_xscale('log')
        if wide and ax is axes[1]:  # time on log-log: linear in the frames is a slope of 1
            ax.set_yscale('log')
        else:
            ax.set_ylim(bottom=0)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a: argparse.Namespace) -> int:
    before = json.loads(Path(a.compare).read_text())['rows'] if a.compare else None
    if a.from_json:
        rows = [r for f in a.from_json for r in json.loads(Path(f).read_text())['rows']]
        print(table(rows))
        if a.plot:
            plot(rows, Path(a.plot), before)
        return 0
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = Path(a.source).resolve() if a.source else Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(source), GLOBLOC_CACHE=str(work / 'cache'), PYTHONUNBUFFERED='1')
    weights = work / 'cache' / imagenet.NAME  # the ImageNet backbone, from the usual cache (no download)
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.symlink_to(imagenet.mobilenet_v2_weights())
    rows = []
    for n in a.frames:
        bags = scene(work, n, a.size, source, env)
        for name in COMMANDS:
            if name in a.commands:
                rows.append(run_one(name, n, bags, work, a, source, env))
                r = rows[-1]
                print(f'{name:>15} {n:>6} frames: {r["peak_rss_gb"]:.2f} GB, {r["wall_s"]:.1f} s '
                      f'({r["cpu_s"]:.1f} s CPU), {r["frames_per_s"]:.1f} frames/s', file=sys.stderr, flush=True)
    print(table(rows))
    result = {'source': str(source), 'size': a.size, 'steps': a.steps, 'eval_frames': a.eval_frames,
              'cpus': os.cpu_count(), 'rows': rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + '\n')
    if a.plot:
        plot(rows, Path(a.plot), before)
    return 0
