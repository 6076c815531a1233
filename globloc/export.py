"""`globloc export`: a model file -> ONNX graph, TensorRT engine or TorchScript module of PoseGraph.

    globloc export --model models/scene.pt --format onnx --out scene.onnx [--dynamic-batch] [--check-bag BAG]
    globloc export --model models/scene.pt --format tensorrt --precision fp16 --out scene.engine
    globloc export --model models/scene.pt --format torchscript --out scene.ts

The exported graph is globloc_ros.net.PoseGraph (inputs, outputs and the ONNX conversion itself: the runtime's
globloc_ros.onnx_export, which this command builds on). Batch is fixed at 1 unless --dynamic-batch. Each graph
carries onnx_export.graph_metadata (format version, input size, normalisation, scene centre/scale, model sha256,
torch version) so that globloc_ros.runtime can check it at load.

Every ONNX graph passes onnx.checker and the TensorRT allow-list (onnx_export.TENSORRT_OPS) before it is written,
and (unless verify=False) onnxruntime must match PyTorch within 1e-4 m and 1e-3 deg on check frames.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from globloc_ros import runtime as rt
from globloc_ros.atomic import atomic_write
from globloc_ros.frames import rotation_error_deg
from globloc_ros.modelfile import load_model
from globloc_ros.net import PoseGraph
# the ONNX conversion is the runtime's (its onnxruntime cache); these names are `globloc export`'s too
from globloc_ros.onnx_export import (OPSET, TENSORRT_OPS, UnsupportedOpError, check_ops, example_inputs,  # noqa: F401
                                     file_sha256, graph_metadata, graph_ops, onnx_graph, to_onnx)

TOL_T_M = 1e-4
TOL_R_DEG = 1e-3

# ONNX node-name scopes of the CNN (TorchScript exporter): in an fp16 engine only these run in fp16.
NETWORK_SCOPES = ('/net/backbone/', '/net/trunk/', '/net/scene_head/', '/net/depth_head/', '/net/weight_head/')


@dataclass
class ExportResult:
    path: Path
    format: str
    ops: Counter | None = None  # ONNX op type -> count
    metadata: dict | None = None
    max_dt_m: float | None = None  # check against PyTorch
    max_drot_deg: float | None = None
    check_frames: int = 0


# ------------------------------------------------------------------------------------------ ONNX
def _check_depths(config) -> list[torch.Tensor]:
    """The depth inputs every check frame runs with: none measured (zeros), and a plane 2 m away measured on the
    left half of the cells only, so both sides of with_measured_depth's where are compared."""
    W, H = config.input_size
    s = config.stride
    half = torch.zeros(1, 1, H // s, W // s)
    half[..., : W // s // 2] = 2.0
    return [torch.zeros_like(half), half]


def synthetic_check_frames(size: tuple[int, int], n: int = 2, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n seeded textured images (H, W, 3) uint8 with a plausible K, for when no bag is given."""
    W, H = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    frames = []
    for _ in range(n):
        base = 127 + 60 * np.sin(xx[..., None] / rng.uniform(5, 30, 3) + yy[..., None] / rng.uniform(5, 30, 3))
        img = np.clip(base + rng.normal(0, 20, (H, W, 3)), 0, 255).astype(np.uint8)
        K = np.array([[0.9 * W, 0, (W - 1) / 2], [0, 0.9 * W, (H - 1) / 2], [0, 0, 1.0]])
        frames.append((img, K))
    return frames


def bag_check_frames(bag, size: tuple[int, int], n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to n frames of a bag spread over the sequence, resized to `size` (W, H) with K scaled."""
    from globloc.bags import read_sequence
    seq = read_sequence(bag, size=tuple(size), progress=False)
    frames = seq.frames
    pick = np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)
    return [(frames[i].image, frames[i].K) for i in pick]


def compare_onnx_with_torch(onnx_path, net, frames) -> tuple[float, float]:
    """Max translation (m) and rotation (deg) difference of T_map_cam between onnxruntime (CPU) and PyTorch
    PoseGraph over `frames` [(image (H, W, 3) uint8, K (3, 3))], fed through runtime.preprocess, each with the
    depth inputs of _check_depths."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    graph = PoseGraph(net.eval())
    dts, drs = [], []
    for (image, K), d in itertools.product(frames, _check_depths(net.config)):
        x, Kt = rt.preprocess(image, K, net.config.input_size)
        T_ort = sess.run(['T_map_cam'], {'image': x.numpy(), 'K': Kt.numpy(), 'depth': d.numpy()})[0]
        with torch.no_grad():
            T_pt = graph(x, Kt, d)[0].numpy()
        dts.append(np.abs(T_ort[:, :3, 3] - T_pt[:, :3, 3]).max())
        drs.append(rotation_error_deg(T_ort[:, :3, :3], T_pt[:, :3, :3]).max())
    return float(max(dts)), float(max(drs))


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    atomic_write(path, lambda f: f.write(data))


def export_onnx(model_path, out, dynamic_batch: bool = False, verify: bool = True,
                check_frames: list | None = None) -> ExportResult:
    """Model file -> ONNX graph of PoseGraph with globloc metadata at `out`.

    Refuses (UnsupportedOpError, nothing written) a graph with an op outside TENSORRT_OPS. With verify, compares
    onnxruntime with PyTorch on check_frames (default: two synthetic frames) and raises RuntimeError (nothing
    written) beyond 1e-4 m / 1e-3 deg.
    """
    model_path, out = Path(model_path), Path(out)
    model, net, meta = onnx_graph(model_path, dynamic_batch)
    result = ExportResult(out, 'onnx', graph_ops(model), meta)
    data = model.SerializeToString()
    if not verify:
        _atomic_write_bytes(data, out)
        return result
    frames = check_frames if check_frames is not None else synthetic_check_frames(net.config.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / 'probe.onnx'
        probe.write_bytes(data)
        dt, dr = compare_onnx_with_torch(probe, net, frames)
    result.max_dt_m, result.max_drot_deg, result.check_frames = dt, dr, len(frames)
    if not (dt <= TOL_T_M and dr <= TOL_R_DEG):
        raise RuntimeError(f'onnxruntime differs from PyTorch by {dt:.2e} m / {dr:.2e} deg over {len(frames)} '
                           f'frames (tolerance {TOL_T_M:g} m / {TOL_R_DEG:g} deg); {out} not written')
    _atomic_write_bytes(data, out)
    return result


# ------------------------------------------------------------------------------------------ TorchScript
def export_torchscript(model_path, out, dynamic_batch: bool = False, check_frames: list | None = None) -> ExportResult:
    """Model file -> torch.jit.trace of PoseGraph, metadata (JSON) in the extra file 'globloc.json'.
    A traced module accepts any batch size (the trace has no batch-dependent constants)."""
    model_path, out = Path(model_path), Path(out)
    net, _ = load_model(model_path)
    meta = graph_metadata(net.config.to_dict(), file_sha256(model_path), dynamic_batch)
    graph = PoseGraph(net).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # torch.jit.trace is deprecated in favour of torch.export; it still works
        traced = torch.jit.trace(graph, example_inputs(net.config), check_trace=False)
    frames = check_frames if check_frames is not None else synthetic_check_frames(net.config.input_size)
    dts, drs = [], []
    for (image, K), d in itertools.product(frames, _check_depths(net.config)):
        x, Kt = rt.preprocess(image, K, net.config.input_size)
        with torch.no_grad():
            a, b = traced(x, Kt, d)[0].numpy(), graph(x, Kt, d)[0].numpy()
        dts.append(np.abs(a[:, :3, 3] - b[:, :3, 3]).max())
        drs.append(rotation_error_deg(a[:, :3, :3], b[:, :3, :3]).max())
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={'globloc.json': json.dumps(meta)})
    _atomic_write_bytes(buf.getvalue(), out)
    return ExportResult(out, 'torchscript', None, meta, float(max(dts)), float(max(drs)), len(frames))


def load_torchscript(path) -> tuple[torch.jit.ScriptModule, dict]:
    """(module, metadata) of a file written by export_torchscript; metadata checked like an ONNX graph's."""
    files = {'globloc.json': ''}
    try:
        module = torch.jit.load(str(path), map_location='cpu', _extra_files=files)
        meta = json.loads(files['globloc.json'] or '{}')
    except (RuntimeError, ValueError, OSError) as e:
        raise rt.LocalizerError(f'{path}: not a readable TorchScript file: {e}') from e
    rt.check_graph_metadata(meta, str(path))
    return module, meta


# ------------------------------------------------------------------------------------------ TensorRT
def _pin_alignment_fp32(network, trt) -> int:
    """In an fp16 build, keep every float layer outside the CNN scopes (normalisation, heads' activations,
    camera coordinates, Horn alignment) in fp32: 24 squarings of a 4x4 matrix do not survive fp16."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name.startswith(NETWORK_SCOPES):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outs and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path, out, precision: str = 'fp16', timing_cache=None, workspace_gib: float = 2.0,
                 max_batch: int = 8) -> dict:
    """Serialize a TensorRT engine of a PoseGraph ONNX (written by export_onnx) to `out`, and its metadata to
    out + '.json' (graph metadata, precision, TensorRT version, GPU name and compute capability, sha256s).
    timing_cache: file read before and written after the build (default: tensorrt.timing-cache beside `out`).
    Raises LocalizerError when TensorRT is not installed, RuntimeError when the parse or build fails."""
    import onnx
    trt = rt._import_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    graph_meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    W, H = rt.check_graph_metadata(graph_meta, str(onnx_path))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split('.')[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f'{onnx_path}: TensorRT {trt.__version__} cannot parse it: {errors}')
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_path = Path(timing_cache) if timing_cache else out.with_name('tensorrt.timing-cache')
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b'')
    config.set_timing_cache(cache, ignore_mismatch=False)
    pinned = 0
    if precision == 'fp16':
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pinned = _pin_alignment_fp32(network, trt)
    dynamic = json.loads(graph_meta.get('globloc.dynamic_batch', 'false'))
    if dynamic:
        profile = builder.create_optimization_profile()
        profile.set_shape('image', (1, 3, H, W), (1, 3, H, W), (max_batch, 3, H, W))
        profile.set_shape('K', (1, 3, 3), (1, 3, 3), (max_batch, 3, 3))
        config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f'TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log above)')
    data = bytes(serialized)
    _atomic_write_bytes(data, out)
    _atomic_write_bytes(bytes(config.get_timing_cache().serialize()), cache_path)
    meta = {
        'format': rt.ENGINE_FORMAT, 'graph': graph_meta, 'precision': precision,
        'tensorrt_version': trt.__version__, 'gpu': rt.gpu_identity(),
        'engine_sha256': file_sha256(out), 'onnx_sha256': file_sha256(onnx_path),
        'max_batch': max_batch if dynamic else 1, 'fp32_pinned_layers': pinned,
        'build_seconds': round(time.perf_counter() - t0, 1), 'timing_cache': str(cache_path),
    }
    _atomic_write_bytes(json.dumps(meta, indent=1).encode(), out.with_name(out.name + '.json'))
    return meta


# ------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True, help='model file (.pt) to export')
    parser.add_argument('--format', required=True, choices=('onnx', 'tensorrt', 'torchscript'))
    parser.add_argument('--out', required=True, help='output file (.onnx, .engine/.plan, .ts)')
    parser.add_argument('--precision', choices=('fp32', 'fp16'), default='fp32',
                        help='engine precision (tensorrt only; fp16 keeps the alignment in fp32)')
    parser.add_argument('--dynamic-batch', action='store_true', help='batch dimension dynamic (default: 1)')
    parser.add_argument('--max-batch', type=int, default=8, help='largest batch of a dynamic TensorRT engine')
    parser.add_argument('--check-bag', help='compare the export with PyTorch on frames of this bag '
                                            '(default: two synthetic frames)')
    parser.add_argument('--check-frames', type=int, default=4, help='frames taken from --check-bag')
    parser.add_argument('--timing-cache', help='TensorRT timing cache file (default: beside --out)')
    parser.add_argument('--workspace-gib', type=float, default=2.0, help='TensorRT builder workspace')


def _print_ops(ops: Counter) -> None:
    print(f'ONNX ops ({sum(ops.values())} nodes, all on the TensorRT allow-list): '
          + ', '.join(f'{op} x{n}' for op, n in sorted(ops.items())))


def run(args: argparse.Namespace) -> int:
    if args.precision == 'fp16' and args.format != 'tensorrt':
        raise ValueError(f'--precision fp16 applies to --format tensorrt (builder FP16 flag); {args.format} is '
                         'exported in fp32 (the torch runtime on CUDA runs fp16 autocast itself)')
    out = Path(args.out)
    if args.format == 'tensorrt':  # fail before the ONNX export, not after
        rt._import_tensorrt('export --format onnx here and build the engine on the target machine')
    net, _ = load_model(args.model)
    frames = bag_check_frames(args.check_bag, net.config.input_size, args.check_frames) if args.check_bag else None
    source = f'{len(frames)} frames of {args.check_bag}' if frames else 'synthetic frames'
    if args.format == 'torchscript':
        res = export_torchscript(args.model, out, args.dynamic_batch, frames)
        print(f'wrote {out} (TorchScript, input {net.config.input_size[0]}x{net.config.input_size[1]}); traced vs '
              f'eager on {source}: {res.max_dt_m:.2e} m, {res.max_drot_deg:.2e} deg')
        return 0
    onnx_out = out if args.format == 'onnx' else None
    with tempfile.TemporaryDirectory() as tmp:
        target = onnx_out or Path(tmp) / (out.stem + '.onnx')
        res = export_onnx(args.model, target, args.dynamic_batch, verify=True, check_frames=frames)
        _print_ops(res.ops)
        print(f'onnxruntime vs PyTorch on {source}: max {res.max_dt_m:.2e} m, {res.max_drot_deg:.2e} deg '
              f'(tolerance {TOL_T_M:g} m, {TOL_R_DEG:g} deg)')
        if onnx_out:
            print(f'wrote {out} (ONNX opset {OPSET}, input {net.config.input_size[0]}x{net.config.input_size[1]}, '
                  f'batch {"dynamic" if args.dynamic_batch else 1})')
            return 0
        meta = build_engine(target, out, args.precision, args.timing_cache, args.workspace_gib, args.max_batch)
    print(f'wrote {out} and {out.name}.json (TensorRT {meta["tensorrt_version"]}, {args.precision}, '
          f'{meta["gpu"]}, {meta["fp32_pinned_layers"]} layers pinned to fp32, built in {meta["build_seconds"]} s)')
    return 0
