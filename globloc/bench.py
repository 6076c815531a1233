"""`globloc bench`: latency of the runtime backends, the Horn vs SVD solvers, and Horn vs solvePnPRansac.

    globloc bench [--model M] [--json PATH] [--sizes 320x240,640x480] [--iters N] [--threads 2]

Default model: the newest models/*.pt, else an untrained GlobLocNet (seed 0; latency is the same, and the
Horn-vs-PnP comparison then uses ground-truth correspondences from the bag's depth instead of the network's).
Camera frames: the real bag ../shared/data/bags/sun3d_frag1 (640x480 RGB-D) when present, else synthetic.

For every backend available here and every input size (the same weights, run fully convolutionally at that
size): per-stage p50/p99 ms of Localizer.localize (preprocess; network, which includes the alignment for fused
graphs; alignment where torch runs it apart) and end-to-end frames/s; onnxruntime on the CPU also with the frames'
depth images (RGB-D input, sampled at the cells in preprocess). Then PyTorch forward+alignment with the
Horn vs the SVD solver, the alignment alone, and on the same correspondences (scene coordinates at the cell
centres) Horn vs baselines.pnp_pose (cv2.solvePnPRansac + LM refinement): time ratio and pose difference.
Last, the refinements against a place map (globloc_ros.placemap) built from the same frames: ICP and image
features from each frame's pose moved by 3 cm / 1 deg, at the recorded size and at half of it.
Targets reported against: ONNX Runtime on CPU with 2 threads >= 30 frames/s end to end at 320x240; alignment
>= 20x faster than solvePnPRansac at equal accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from globloc.dataset import parse_size
from globloc_ros import frames as fr
from globloc_ros import runtime as rt
from globloc_ros.align import align_weighted
from globloc_ros.modelfile import load_model, save_model
from globloc_ros.net import GlobLocNet, NetConfig, count_macs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BAG = REPO.parent / 'shared' / 'data' / 'bags' / 'sun3d_frag1'
FPS_TARGET = 30.0
SPEEDUP_TARGET = 20.0
ORACLE_NOISE_M = 0.02  # Gaussian noise (m) added to ground-truth correspondences, camera and map side


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', help='model file (.pt); default: newest models/*.pt, else an untrained network')
    parser.add_argument('--json', help='write the figures here')
    parser.add_argument('--sizes', default='320x240,640x480', help='network input sizes WxH, comma separated')
    parser.add_argument('--iters', type=int, default=100, help='timed frames per backend and size')
    parser.add_argument('--warmup', type=int, default=10, help='untimed frames before each run')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (onnxruntime intra-op, torch)')
    parser.add_argument('--bag', default=str(DEFAULT_BAG), help='RGB-D bag for camera frames and correspondences')
    parser.add_argument('--frames', type=int, default=8, help='frames read from the bag')


# ------------------------------------------------------------------------------------------ helpers
def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def p50_p99(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(np.percentile(v, 50)), float(np.percentile(v, 99))


def newest_model(folder: Path = Path('models')) -> Path | None:
    """The newest GlobLocNet model file in `folder` (baseline architectures skipped), or None."""
    from globloc_ros.modelfile import ModelFileError, read_model_dict
    for path in sorted(folder.glob('*.pt'), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if read_model_dict(path)['config'].get('extra', {}).get('arch', 'globloc') == 'globloc':
                return path
        except ModelFileError:
            continue
    return None


def resized_net(net: GlobLocNet, size: tuple[int, int]) -> GlobLocNet:
    """The same weights at another input size (the network is fully convolutional)."""
    cfg = NetConfig.from_dict({**net.config.to_dict(), 'input_size': tuple(size)})
    out = GlobLocNet(cfg)
    out.load_state_dict(net.state_dict())
    return out.eval()


def camera_frames(bag: str | None, n: int) -> tuple[list, str]:
    """[(image (480, 640, 3) uint8, K, T_map_cam or None, depth or None)] and a description."""
    if bag and Path(bag).exists():
        from globloc.bags import read_sequence
        seq = read_sequence(bag, max_frames=n, progress=False)
        return [(f.image, f.K, f.T_map_cam, f.depth) for f in seq.frames], f'{len(seq.frames)} real frames of {bag}'
    rng = np.random.default_rng(0)
    W, H = 640, 480
    K = np.array([[525.0, 0, (W - 1) / 2], [0, 525.0, (H - 1) / 2], [0, 0, 1]])
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        depth = (2.0 + rng.uniform(-0.5, 0.5) + 0.3 * np.sin(np.arange(W) / 50.0)[None] * np.ones((H, 1))).astype(np.float32)
        q = np.r_[rng.normal(size=3) * 0.2, 1.0]
        R = fr.quat_xyzw_to_matrix(q / np.linalg.norm(q))
        out.append((img, K, fr.pose_matrix(R, rng.normal(size=3)), depth))
    return out, f'{n} synthetic 640x480 frames (no bag at {bag})'


# ------------------------------------------------------------------------------------------ measurements
def backends_here() -> tuple[list[tuple[str, str, str | None]], dict[str, str]]:
    """[(backend, device, precision)] runnable on this machine (precision None: the backend's default), and
    {name: why not} for the others."""
    ok_ort, ort_cuda = rt._ort_available()
    run, skipped = [], {}
    try:
        import tensorrt  # noqa: F401
        trt = torch.cuda.is_available()
        if not trt:
            skipped['tensorrt'] = 'TensorRT is installed but torch has no CUDA for its buffers'
    except ImportError:
        trt = False
        skipped['tensorrt'] = 'TensorRT is not installed'
    if trt:
        run.append(('tensorrt', 'cuda', None))
    if torch.cuda.is_available():
        run += [('torch', 'cuda', 'fp16'), ('torch', 'cuda', 'fp32')]
    else:
        skipped['torch cuda'] = 'no CUDA GPU'
    if ok_ort:
        run.append(('onnxruntime', 'cpu', None))
        if ort_cuda:
            run.append(('onnxruntime', 'cuda', None))
        else:
            skipped['onnxruntime cuda'] = 'no CUDAExecutionProvider'
    else:
        skipped['onnxruntime'] = 'onnxruntime is not installed'
    run.append(('torch', 'cpu', None))
    return run, skipped


def time_localizer(lz: rt.Localizer, frames, iters: int, warmup: int, depth: bool = False) -> dict:
    """Per-stage p50/p99 ms and frames/s over frames [(image, K, ...[, depth])], with their depth images if depth
    (the 4th item)."""
    def args(i):
        f = frames[i % len(frames)]
        return (f[0], f[1], f[3]) if depth else (f[0], f[1])
    for i in range(warmup):
        lz.localize(*args(i))
    stages: dict[str, list] = {}
    for i in range(iters):
        for k, v in lz.localize(*args(i)).timings_ms.items():
            stages.setdefault(k, []).append(v)
    out = {k: dict(zip(('p50', 'p99'), p50_p99(v))) for k, v in stages.items()}
    out['fps'] = 1000.0 / float(np.mean(stages['total']))
    return out


def time_refinement(frames, repeats: int = 3) -> dict:
    """{'WxH': {'icp'|'features': {'p50', 'p99', 'accepted'}}}: placemap.refine_icp / refine_features from each
    frame's pose moved by 3 cm / 1 deg, against a map of the frames, at the recorded size and half of it."""
    import cv2

    from globloc_ros import placemap as pm
    out: dict = {}
    rng = np.random.default_rng(0)
    for scale in (1.0, 0.5):
        views = []
        for image, K, T, depth in frames:
            H, W = image.shape[:2]
            size = (round(W * scale), round(H * scale))
            views.append(pm.View(cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                                 fr.scale_intrinsics(K, size[0] / W, size[1] / H), T,
                                 cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST)))
        place = pm.build_map(views)
        place.tree  # built now, out of the timing
        times: dict[str, list] = {'icp': [], 'features': []}
        accepted: dict[str, int] = {'icp': 0, 'features': 0}
        for _ in range(repeats):
            for v in views:
                T0 = v.T_map_cam.copy()
                T0[:3, :3] = cv2.Rodrigues(rng.normal(0, np.radians(1.0) / np.sqrt(3), 3))[0] @ T0[:3, :3]
                T0[:3, 3] += rng.normal(0, 0.03 / np.sqrt(3), 3)
                for method in times:
                    t0 = time.perf_counter()
                    r = (pm.refine_icp(place, T0, v.depth, v.K, np.eye(6)) if method == 'icp'
                         else pm.refine_features(place, T0, v.image, v.K, np.eye(6)))
                    times[method].append((time.perf_counter() - t0) * 1e3)
                    accepted[method] += r.accepted
        W, H = views[0].image.shape[1], views[0].image.shape[0]
        out[f'{W}x{H}'] = {m: {**dict(zip(('p50', 'p99'), p50_p99(t))), 'accepted': accepted[m] / len(t)}
                           for m, t in times.items()}
    return out


def time_solvers(net: GlobLocNet, frames, iters: int) -> dict:
    """PyTorch forward+alignment with each solver, and the alignment alone on the network's outputs."""
    x, K = rt.preprocess(frames[0][0], frames[0][1], net.config.input_size)
    out: dict = {}
    with torch.no_grad():
        pred = net(x, K)
        map_pts = pred.scene_coords.flatten(2).transpose(1, 2)
        for solver in ('horn', 'svd'):
            full, alone = [], []
            for i in range(iters + 3):
                t0 = time.perf_counter()
                net(x, K, solver=solver)
                t1 = time.perf_counter()
                align_weighted(pred.cam_coords, map_pts, pred.weights, solver)
                t2 = time.perf_counter()
                if i >= 3:
                    full.append((t1 - t0) * 1e3)
                    alone.append((t2 - t1) * 1e3)
            out[solver] = {'forward+alignment': dict(zip(('p50', 'p99'), p50_p99(full))),
                           'alignment': dict(zip(('p50', 'p99'), p50_p99(alone)))}
    return out


def correspondences(net: GlobLocNet, frame, oracle: bool, rng: np.random.Generator):
    """Scene coords (3, h, w), cam coords (N, 3), weights (N,), K (3, 3) at the network's input size, GT pose.

    oracle: cam coords from the bag's depth at the cell centres (nearest pixel) along the exact cell-centre rays,
    scene coords = T_gt cam coords, both with ORACLE_NOISE_M Gaussian noise; uniform weights. Else the network's."""
    image, K0, T_gt, depth = frame
    W, H = net.config.input_size
    x, Kt = rt.preprocess(image, K0, (W, H))
    K = Kt[0].double().numpy()
    s = net.config.stride
    h, w = H // s, W // s
    uv = fr.cell_centres(h, w, s).numpy()
    if not oracle:
        with torch.no_grad():
            pred = net(x, Kt)
        return (pred.scene_coords[0].double().numpy(), pred.cam_coords[0].double().numpy(),
                pred.weights[0].double().numpy(), K, T_gt)
    d = cv2_nearest(depth, (W, H))
    px = np.clip(np.rint(uv).astype(int), 0, [W - 1, H - 1])
    z = d[px[:, 1], px[:, 0]].astype(np.float64)
    z = np.where(np.isfinite(z) & (z > 0.1) & (z < 6.0), z, np.nan)
    cam = np.stack([(uv[:, 0] - K[0, 2]) / K[0, 0] * z, (uv[:, 1] - K[1, 2]) / K[1, 1] * z, z], -1)
    scene = cam @ T_gt[:3, :3].T + T_gt[:3, 3]
    scene = scene + rng.normal(0, ORACLE_NOISE_M, scene.shape)
    cam = cam + rng.normal(0, ORACLE_NOISE_M, cam.shape)
    weights = np.where(np.isfinite(z), 1.0, 0.0)
    return scene.T.reshape(3, h, w), cam, weights, K, T_gt


def cv2_nearest(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2
    return cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST_EXACT)


class _HornGraph(torch.nn.Module):
    """The alignment alone, as it runs inside the exported graph."""

    def forward(self, cam: torch.Tensor, map_pts: torch.Tensor, weights: torch.Tensor):
        a = align_weighted(cam, map_pts, weights, 'horn')
        return a.R, a.t, a.residual, a.n_eff


def _horn_session(n_points: int):
    """onnxruntime session (1 thread) of the Horn alignment for n_points correspondences."""
    import onnxruntime as ort
    from globloc.export import to_onnx
    ex = (torch.randn(1, n_points, 3), torch.randn(1, n_points, 3), torch.rand(1, n_points))
    model = to_onnx(_HornGraph(), ex, ('cam', 'map', 'w'), ('R', 't', 'residual', 'n_eff'))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=['CPUExecutionProvider'])


def horn_vs_pnp(net: GlobLocNet, frames, oracle: bool, repeats: int = 20) -> dict:
    """Horn (torch eager and onnxruntime, 1 thread) vs baselines.pnp_pose (OpenCV, 1 thread), same inputs."""
    import cv2
    from globloc.baselines import pnp_pose
    rng = np.random.default_rng(0)
    n_points = (net.config.input_size[0] // net.config.stride) * (net.config.input_size[1] // net.config.stride)
    try:
        session = _horn_session(n_points)
    except ImportError:
        session = None
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    t_horn, t_ort, t_pnp, err_h, err_p, diff, fails = [], [], [], [], [], [], 0
    try:
        for frame in frames:
            if frame[2] is None or (oracle and frame[3] is None):
                continue
            scene, cam, weights, K, T_gt = correspondences(net, frame, oracle, rng)
            cam_t = torch.from_numpy(cam).float()[None]
            map_t = torch.from_numpy(scene.reshape(3, -1).T.copy()).float()[None]
            w_t = torch.from_numpy(weights).float()[None]
            with torch.no_grad():
                for r in range(repeats + 2):
                    t0 = time.perf_counter()
                    a = align_weighted(cam_t, map_t, w_t, 'horn')
                    if r >= 2:
                        t_horn.append((time.perf_counter() - t0) * 1e3)
            if session is not None:
                feed = {'cam': cam_t.numpy(), 'map': map_t.numpy(), 'w': w_t.numpy()}
                for r in range(repeats + 2):
                    t0 = time.perf_counter()
                    session.run(None, feed)
                    if r >= 2:
                        t_ort.append((time.perf_counter() - t0) * 1e3)
            for _ in range(max(3, repeats // 4)):
                t0 = time.perf_counter()
                T_pnp, ok, _ = pnp_pose(scene.astype(np.float32), K, net.config.stride)
                t_pnp.append((time.perf_counter() - t0) * 1e3)
            T_h = fr.pose_matrix(a.R[0].double().numpy(), a.t[0].double().numpy())
            if not ok:
                fails += 1
                continue
            dt, dr = fr.pose_errors(T_h, T_gt)
            err_h.append((float(dt), float(dr)))
            dt, dr = fr.pose_errors(T_pnp, T_gt)
            err_p.append((float(dt), float(dr)))
            diff.append((float(np.linalg.norm(T_h[:3, 3] - T_pnp[:3, 3])),
                         float(fr.rotation_error_deg(T_h[:3, :3], T_pnp[:3, :3]))))
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    if not t_horn:
        return {}
    med = lambda rows, i: float(np.median([r[i] for r in rows])) if rows else float('nan')  # noqa: E731
    out = {
        'correspondences': 'oracle (bag depth + GT pose, %.0f cm noise)' % (ORACLE_NOISE_M * 100) if oracle
                           else 'network scene coords + depth',
        'points': n_points, 'threads': 1,
        'horn_torch_ms': dict(zip(('p50', 'p99'), p50_p99(t_horn))),
        'pnp_ms': dict(zip(('p50', 'p99'), p50_p99(t_pnp))),
        'speedup_torch_p50': float(np.median(t_pnp) / np.median(t_horn)),
        'horn_error_median': {'m': med(err_h, 0), 'deg': med(err_h, 1)},
        'pnp_error_median': {'m': med(err_p, 0), 'deg': med(err_p, 1)},
        'horn_vs_pnp_median': {'m': med(diff, 0), 'deg': med(diff, 1)},
        'pnp_failures': fails, 'frames': len(err_h) + fails,
    }
    if t_ort:
        out['horn_onnxruntime_ms'] = dict(zip(('p50', 'p99'), p50_p99(t_ort)))
        out['speedup_onnxruntime_p50'] = float(np.median(t_pnp) / np.median(t_ort))
    return out


# ------------------------------------------------------------------------------------------ command
def _fmt(d: dict | None) -> str:
    return '-' if not d else f"{d['p50']:.2f}/{d['p99']:.2f}"


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(',') if s.strip()]
    if args.iters < 1 or args.threads < 1:
        raise ValueError('--iters and --threads must be >= 1')
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix='globloc-bench-')
    try:
        model = Path(args.model) if args.model else newest_model()
        untrained = model is None
        if untrained:
            torch.manual_seed(0)
            model = Path(tmp.name) / 'untrained.pt'
            save_model(GlobLocNet(NetConfig()), model, meta={'note': 'untrained, seed 0'})
        net, _ = load_model(model)
        frames, frames_text = camera_frames(args.bag, args.frames)
        params = sum(p.numel() for p in net.parameters())
        report: dict = {
            'device': {'cpu': cpu_name(), 'cores': os.cpu_count(), 'gpu': rt.gpu_identity(),
                       'load_average_1min_start': load_start},
            'model': 'untrained GlobLocNet (seed 0): no models/*.pt' if untrained else str(model),
            'frames': frames_text, 'threads': args.threads, 'iters': args.iters, 'torch': torch.__version__,
            'parameters': params, 'macs': {f'{W}x{H}': count_macs(net, W, H) for W, H in sizes},
            'runs': [], 'skipped': {}, 'solvers': {}, 'horn_vs_pnp': {}, 'horn_vs_pnp_network': {},
            'refinement': {},
        }
        print(f"device: {report['device']['cpu']} ({os.cpu_count()} cores), GPU: {report['device']['gpu'] or 'none'}, "
              f'load average {load_start:.2f}')
        print(f"model: {report['model']}")
        if untrained:
            print('  (untrained: latency figures are real; accuracy needs a trained model, so Horn vs PnP runs on '
                  'ground-truth correspondences only)')
        print(f'frames: {frames_text}; threads {args.threads}; torch {torch.__version__}')
        print(f'parameters: {params:,}; MACs: ' + ', '.join(f'{k} {v / 1e9:.2f} G' for k, v in report['macs'].items()))

        available, report['skipped'] = backends_here()
        for (W, H) in sizes:
            snet = resized_net(net, (W, H))
            spath = Path(tmp.name) / f'model_{W}x{H}.pt'
            save_model(snet, spath, meta={'bench': True})
            for backend, device, precision in available:
                kwargs = dict(backend=backend, device=device, precision=precision, cache_dir=tmp.name,
                              threads=args.threads if device == 'cpu' else None)
                path = spath
                if backend == 'tensorrt':
                    path = _build_engine(spath, Path(tmp.name), W, H)
                lz = rt.Localizer(path, **kwargs)
                for depth in (False, True) if (backend, device) == ('onnxruntime', 'cpu') else (False,):
                    stats = time_localizer(lz, frames, args.iters, args.warmup, depth)
                    report['runs'].append({'backend': backend, 'device': device, 'precision': lz.precision,
                                           'threads': kwargs['threads'], 'size': f'{W}x{H}',
                                           'input': 'rgbd' if depth else 'rgb', **stats})
            report['solvers'][f'{W}x{H}'] = time_solvers(snet, frames, max(10, args.iters // 2))
            report['horn_vs_pnp'][f'{W}x{H}'] = horn_vs_pnp(snet, frames, oracle=True)
            if not untrained:
                report['horn_vs_pnp_network'][f'{W}x{H}'] = horn_vs_pnp(snet, frames, oracle=False)
        if all(f[2] is not None and f[3] is not None for f in frames):
            report['refinement'] = time_refinement(frames)
        report['device']['load_average_1min_end'] = os.getloadavg()[0]
        _print_report(report)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
            print(f'wrote {args.json}')
    finally:
        tmp.cleanup()
    return 0


def _build_engine(model: Path, folder: Path, W: int, H: int) -> Path:
    from globloc.export import build_engine, export_onnx
    onnx_path = folder / f'model_{W}x{H}.onnx'
    export_onnx(model, onnx_path, verify=False)
    engine = folder / f'model_{W}x{H}.engine'
    build_engine(onnx_path, engine, 'fp16')
    return engine


def _print_report(report: dict) -> None:
    print('\nend to end (Localizer.localize from a 640x480 camera image), ms p50/p99:')
    head = f"{'backend':<12}{'device':<7}{'prec':<6}{'thr':<5}{'size':<9}{'input':<6}{'preprocess':>13}" \
           f"{'network':>15}" \
           f"{'alignment':>13}{'total':>15}{'frames/s':>10}"
    print(head)
    print('-' * len(head))
    for r in report['runs']:
        print(f"{r['backend']:<12}{r['device']:<7}{r['precision']:<6}{str(r['threads'] or '-'):<5}{r['size']:<9}"
              f"{r['input']:<6}"
              f"{_fmt(r.get('preprocess')):>13}{_fmt(r.get('network')):>15}{_fmt(r.get('alignment')):>13}"
              f"{_fmt(r.get('total')):>15}{r['fps']:>10.1f}")
    print('  network = network + alignment for fused graphs (onnxruntime, tensorrt, torch CUDA graph)')
    for name, why in report['skipped'].items():
        print(f'  not run: {name}: {why}')
    print('\nPyTorch CPU, solver comparison, ms p50/p99:')
    print(f"{'size':<9}{'solver':<7}{'forward+alignment':>20}{'alignment alone':>18}")
    for size, solvers in report['solvers'].items():
        for solver, d in solvers.items():
            print(f"{size:<9}{solver:<7}{_fmt(d['forward+alignment']):>20}{_fmt(d['alignment']):>18}")
    for key in ('horn_vs_pnp', 'horn_vs_pnp_network'):
        if report[key]:
            _print_pnp_table(report[key])
    if report['refinement']:
        one_shot = [r['total']['p50'] for r in report['runs'] if r['backend'] == 'onnxruntime'
                    and r['device'] == 'cpu' and r['size'] == '320x240' and r['input'] == 'rgb']
        print('\nrefinement against a place map of the frames (from 3 cm / 1 deg off), ms p50/p99 '
              '(accepted)' + (f'; x = times the one-shot onnxruntime 320x240 p50 ({one_shot[0]:.1f} ms)'
                              if one_shot else ''))
        for size, d in report['refinement'].items():
            print(f'{size:<9}' + '   '.join(
                f"{m} {_fmt(v)} ({v['accepted']:.0%})" + (f' {v["p50"] / one_shot[0]:.1f}x' if one_shot else '')
                for m, v in d.items()))
    print('\ntargets:')
    ort = [r for r in report['runs'] if r['backend'] == 'onnxruntime' and r['device'] == 'cpu'
           and r['size'] == '320x240' and r['input'] == 'rgb']
    if ort:
        fps = ort[0]['fps']
        verdict = 'met' if fps >= FPS_TARGET else 'NOT met'
        print(f"  onnxruntime CPU {ort[0]['threads']} threads, 320x240: {fps:.1f} frames/s "
              f'(target >= {FPS_TARGET:.0f}): {verdict}')
    for size, d in report['horn_vs_pnp'].items():
        if d:
            speedup = d.get('speedup_onnxruntime_p50', d['speedup_torch_p50'])
            where = 'onnxruntime' if 'speedup_onnxruntime_p50' in d else 'torch'
            eh, ep = d['horn_error_median'], d['pnp_error_median']
            accuracy = 'at least as accurate' if eh['m'] <= 1.1 * ep['m'] + 1e-3 and eh['deg'] <= 1.1 * ep['deg'] + 0.01 \
                else 'LESS accurate'
            print(f"  alignment ({where}) vs solvePnPRansac at {size}: {speedup:.1f}x faster (target >= "
                  f"{SPEEDUP_TARGET:.0f}x): {'met' if speedup >= SPEEDUP_TARGET else 'NOT met'}; Horn {accuracy} "
                  f"(median {eh['m']:.3f} m/{eh['deg']:.2f} deg vs {ep['m']:.3f} m/{ep['deg']:.2f} deg); "
                  f"torch eager: {d['speedup_torch_p50']:.1f}x")
    dev = report['device']
    print(f"  load average (1 min) {dev['load_average_1min_start']:.2f} at start, "
          f"{dev['load_average_1min_end']:.2f} at end: above {dev['cores']} the timings include other processes' work")


def _print_pnp_table(rows: dict) -> None:
    print('\nHorn alignment vs baselines.pnp_pose (solvePnPRansac P3P + LM) on the same correspondences, 1 thread, '
          'ms p50/p99:')
    print(f"{'size':<9}{'points':>7}{'horn torch':>14}{'horn ort':>13}{'pnp':>14}{'speedup t/ort':>15}"
          f"{'horn err m/deg':>16}{'pnp err m/deg':>16}{'horn-pnp m/deg':>16}{'pnp fail':>9}")
    for size, d in rows.items():
        if not d:
            print(f'{size:<9} (no frames with a ground-truth pose)')
            continue
        e = lambda k: f"{d[k]['m']:.3f}/{d[k]['deg']:.2f}"  # noqa: E731
        sp = f"{d['speedup_torch_p50']:.1f}/{d.get('speedup_onnxruntime_p50', float('nan')):.1f}x"
        print(f"{size:<9}{d['points']:>7}{_fmt(d['horn_torch_ms']):>14}{_fmt(d.get('horn_onnxruntime_ms')):>13}"
              f"{_fmt(d['pnp_ms']):>14}{sp:>15}{e('horn_error_median'):>16}{e('pnp_error_median'):>16}"
              f"{e('horn_vs_pnp_median'):>16}{d['pnp_failures']:>5}/{d['frames']}")
    print(f"  correspondences: {next(iter(rows.values())).get('correspondences', '-')}; "
          'errors are medians against the ground-truth pose')
