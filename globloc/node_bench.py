"""`globloc node-bench`: the localizer node's end-to-end latency and sustained rate over DDS, beside the
bare Localizer on the same frames, so that the node's overhead shows.

    globloc node-bench [--model M] [--sizes 320x240,640x480] [--backend onnxruntime] [--threads 2]

Per size WxH: the model's weights at input WxH (untrained when no model is given: the timing is the
same), camera frames at WxH written as a bag, then
- bare: Localizer.localize in this process (p50/p99 ms, frames/s = 1000 / mean);
- node: globloc-localizer in a child process; globloc-replay (another child) publishes the bag with
  fresh stamps (--restamp) and records the poses it gets back. Latency = pose receipt - image stamp,
  at a low rate (--latency-hz) so that nothing queues; sustained frames/s = poses received per second
  while the bag is published faster than the node can follow (--flood-hz, for --seconds).
End-to-end overhead = node p50 - the Localizer's p50 inside the node (from its /diagnostics, measured in
the same run): DDS both ways, both executors, message conversion, publishing. In-node overhead = image callback -> pose published, minus
Localizer.localize, per frame, from the node's own /diagnostics. Targets: >= 30 frames/s at 320x240,
in-node overhead < 2 ms. This module never imports rclpy; the DDS side
runs in globloc_ros.node and globloc_ros.replay.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

FPS_TARGET = 30.0
OVERHEAD_TARGET_MS = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', help='model file (.pt); default: newest models/*.pt, else an untrained network')
    parser.add_argument('--sizes', default='320x240,640x480', help='image and network input sizes WxH')
    parser.add_argument('--backend', default='onnxruntime', help='Localizer backend (default onnxruntime)')
    parser.add_argument('--threads', type=int, default=2, help='inference threads (default 2)')
    parser.add_argument('--frames', type=int, default=30, help='distinct frames in the bag (default 30)')
    parser.add_argument('--latency-hz', type=float, default=10.0, help='publish rate of the latency run')
    parser.add_argument('--latency-frames', type=int, default=60, help='frames in the latency run')
    parser.add_argument('--flood-hz', type=float, default=120.0, help='publish rate of the throughput run')
    parser.add_argument('--seconds', type=float, default=5.0, help='length of the throughput run')
    parser.add_argument('--bag', default=None, help='RGB bag for camera frames (default: as `globloc bench`)')
    parser.add_argument('--json', help='write the figures here')


def _env(tmp: Path) -> dict:
    return dict(os.environ, ROS_DOMAIN_ID=str(random.SystemRandom().randint(10, 99)),
                ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', ROS_LOG_DIR=str(tmp / 'log'), PYTHONUNBUFFERED='1')


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _replay(bag: Path, env: dict, out: Path, *args: str) -> dict:
    cmd = [sys.executable, '-m', 'globloc_ros.replay', str(bag), '--restamp', '--record', '/globloc/pose',
           '--out', str(out), '--wait', '120', '--settle', '1.5', *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f'replay failed ({run.returncode}): {run.stderr.strip()[-500:]}')
    return json.loads(out.read_text())


def node_figures(model: Path, bag: Path, args, tmp: Path) -> dict:
    """Run the node on `model` and replay `bag` twice: a latency run and a throughput run."""
    from globloc.bench import p50_p99

    env = _env(tmp)
    log = open(tmp / 'node.log', 'w')
    node = subprocess.Popen([sys.executable, '-m', 'globloc_ros.node', '--ros-args', '-p', f'model:={model}',
                             '-p', f'backend:={args.backend}', '-p', f'threads:={args.threads}',
                             '-p', 'max_residual_m:=1000000.0', '-p', 'min_effective_points:=0.0'],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lat = _replay(bag, env, tmp / 'latency.json', '--loop', '--rate-hz', str(args.latency_hz),
                      '--duration', str(args.latency_frames / args.latency_hz))
        sent = {s for s, _ in lat['sent']}
        delays = [(r - s) / 1e6 for s, r in lat['received'] if s in sent]
        flood = _replay(bag, env, tmp / 'flood.json', '--loop', '--rate-hz', str(args.flood_hz),
                        '--duration', str(args.seconds))
        recv = sorted(r for _, r in flood['received'])
        span = (recv[-1] - recv[0]) / 1e9 if len(recv) > 1 else float('nan')
        if node.poll() is not None:
            raise RuntimeError(f'the node exited ({node.returncode}): {(tmp / "node.log").read_text()[-800:]}')
    finally:
        _stop(node)
        log.close()
    if not delays:
        raise RuntimeError(f'no pose came back from the node: {(tmp / "node.log").read_text()[-800:]}')
    p50, p99 = p50_p99(delays)
    diag = lat.get('diagnostics', {})
    return {'latency_p50_ms': p50, 'latency_p99_ms': p99, 'latency_frames_sent': len(lat['sent']),
            'node_localize_p50_ms': float(diag.get('localize_p50_ms', 'nan')),
            'node_internal_overhead_p50_ms': float(diag.get('node_overhead_p50_ms', 'nan')),
            'node_internal_overhead_p99_ms': float(diag.get('node_overhead_p99_ms', 'nan')),
            'latency_frames_received': len(delays),
            'flood_sent_fps': len(flood['sent']) / max(flood['duration_s'], 1e-9),
            'sustained_fps': (len(recv) - 1) / span if span > 0 else float('nan'),
            'flood_frames_sent': len(flood['sent']), 'flood_frames_received': len(recv)}


def run(args: argparse.Namespace) -> int:
    from globloc import bags, bench
    from globloc.dataset import parse_size
    from globloc_ros import frames as fr
    from globloc_ros import runtime as rt
    from globloc_ros.modelfile import load_model, save_model
    from globloc_ros.net import GlobLocNet, NetConfig

    sizes = [parse_size(s) for s in args.sizes.split(',')]
    model = Path(args.model) if args.model else bench.newest_model(Path(bench.REPO / 'models'))
    if model is not None:
        net, _ = load_model(model)
        what = str(model)
    else:
        import torch
        torch.manual_seed(0)
        net, what = GlobLocNet(NetConfig()), 'untrained GlobLocNet (seed 0)'
    source, source_what = bench.camera_frames(args.bag or str(bench.DEFAULT_BAG), args.frames)
    report = {'cpu': bench.cpu_name(), 'cores': os.cpu_count(), 'backend': args.backend, 'threads': args.threads,
              'model': what, 'frames': source_what, 'sizes': {}}
    print(f'node benchmark: {what}; {source_what}; backend {args.backend}, {args.threads} threads; '
          f'{report["cpu"]} ({report["cores"]} cores)', flush=True)
    for W, H in sizes:
        with tempfile.TemporaryDirectory(prefix='globloc_node_bench_') as d:
            tmp = Path(d)
            path = tmp / f'model_{W}x{H}.pt'
            save_model(bench.resized_net(net, (W, H)), path, {'note': 'node-bench'})
            frames = []
            for i, (img, K, T, _) in enumerate(source):
                h0, w0 = img.shape[:2]
                frames.append(bags.Frame(seq=0, index=i, stamp_ns=1_000_000_000 + i * 33_333_333,
                                         image=cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA),
                                         K=fr.scale_intrinsics(K, W / w0, H / h0),
                                         T_map_cam=T if T is not None else np.eye(4)))
            bag = tmp / 'bag'
            bags.write_sequence(bag, frames)
            lz = rt.Localizer(path, backend=args.backend, threads=args.threads, max_residual_m=1e6,
                              min_effective_points=0.0, cache_dir=tmp / 'cache')
            bare = bench.time_localizer(lz, [(f.image, f.K) for f in frames], iters=100, warmup=10)
            del lz
            node = node_figures(path, bag, args, tmp)
        # The Localizer's time inside the node (same process, same minute) is the reference for the end-to-end
        # overhead: on a shared machine the bare figure, measured a minute earlier, can differ by more.
        row = {'bare_p50_ms': bare['total']['p50'], 'bare_p99_ms': bare['total']['p99'], 'bare_fps': bare['fps'],
               **node, 'overhead_p50_ms': node['latency_p50_ms'] - node['node_localize_p50_ms']}
        report['sizes'][f'{W}x{H}'] = row
        print(f'  {W}x{H}: bare {row["bare_p50_ms"]:.1f}/{row["bare_p99_ms"]:.1f} ms, node '
              f'{row["latency_p50_ms"]:.1f}/{row["latency_p99_ms"]:.1f} ms, {row["sustained_fps"]:.1f} frames/s',
              flush=True)
    _print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f'wrote {args.json}')
    return 0


def _print_table(report: dict) -> None:
    print('\n| size | bare Localizer p50 / p99 ms | bare frames/s | node end-to-end p50 / p99 ms | '
          'node sustained frames/s | Localizer in the node p50 ms | end-to-end overhead p50 ms | '
          'in-node overhead p50 / p99 ms |')
    print('|---|---|---|---|---|---|---|---|')
    for size, r in report['sizes'].items():
        print(f'| {size} | {r["bare_p50_ms"]:.2f} / {r["bare_p99_ms"]:.2f} | {r["bare_fps"]:.1f} | '
              f'{r["latency_p50_ms"]:.2f} / {r["latency_p99_ms"]:.2f} | {r["sustained_fps"]:.1f} '
              f'(sent {r["flood_sent_fps"]:.0f}/s) | {r["node_localize_p50_ms"]:.2f} | {r["overhead_p50_ms"]:.2f} | '
              f'{r["node_internal_overhead_p50_ms"]:.2f} / {r["node_internal_overhead_p99_ms"]:.2f} |')
    r = report['sizes'].get('320x240')
    if r:
        ok_fps = r['sustained_fps'] >= FPS_TARGET
        ok_over = r['node_internal_overhead_p50_ms'] < OVERHEAD_TARGET_MS
        print(f'\ntargets at 320x240: >= {FPS_TARGET:g} frames/s: {"met" if ok_fps else "NOT met"} '
              f'({r["sustained_fps"]:.1f}); in-node overhead < {OVERHEAD_TARGET_MS:g} ms: '
              f'{"met" if ok_over else "NOT met"} ({r["node_internal_overhead_p50_ms"]:.2f} ms; end to end, with '
              f'DDS both ways: {r["overhead_p50_ms"]:.2f} ms)')
    print(f'(end-to-end: image stamp -> pose received by another process; end-to-end overhead: that minus the '
          f'Localizer time inside the node; in-node: image callback -> pose published, minus Localizer.localize, '
          f'from the node\'s /diagnostics; {report["cores"]} CPU cores shared by the node, the replay and DDS; '
          f'backend {report["backend"]})')
