"""The deployable localizer: one image + K in, T_map_cam with a confidence verdict out. Never imports rclpy.

    lz = Localizer('models/scene.pt')                # backend='auto': the fastest one available here
    result = lz.localize(rgb, K)                     # rgb (H, W, 3) uint8, K (3, 3) of that image
    result = lz.localize(rgb, K, depth)              # RGB-D: depth (H, W) metres registered to rgb
    lz = Localizer('models/scene.pt', place_map='scene.map.npz')  # + refined against the map (`globloc map`)
    if result.confident: publish(result.T_map_cam, result.covariance)

Model files it reads (each checked at construction, never at the first frame):
- a model file (.pt, globloc_ros.modelfile): run by torch, or by onnxruntime through an ONNX graph exported
  once into a cache file named by the model's sha256 (`cache_dir`, default $GLOBLOC_CACHE or ~/.cache/globloc);
- an ONNX graph written by `globloc export --format onnx` (metadata_props checked);
- a TensorRT engine (.engine / .plan) with its PATH.json written by `globloc export --format tensorrt`
  (format, sha256, TensorRT version and GPU checked).
All of them run the same graph, globloc_ros.net.PoseGraph: image (B, 3, H, W) RGB 0..255 at the model's
fixed input size, K (B, 3, 3) of that image and depth (B, 1, h, w) metres at the stride-8 cells (0: not measured,
the depth head's depth is used there) -> T_map_cam (B, 4, 4), residual (B,) m, n_eff (B,), spread (B,) m.
Normalisation is inside the graph; `preprocess` only resizes, scales K and lays out CHW; `preprocess_depth`
samples a measured depth image at the cells (all zeros without one).

`auto` picks: tensorrt (for an engine) > torch on CUDA (fp16 autocast network, fp32 alignment, one captured
CUDA graph) > onnxruntime (CUDA provider if present, else CPU) > torch on CPU.

Confidence gating lives here and only here (`gate`).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import torch

from globloc_ros import align as _align
from globloc_ros.atomic import atomic_write
from globloc_ros.frames import backproject, cell_centres, measured_depth_at_cells, pose_errors, scale_intrinsics
from globloc_ros.net import with_measured_depth
from globloc_ros.onnx_export import EXPORT_VERSION, GRAPH_FORMAT, INPUT_NAMES, OUTPUT_NAMES, file_sha256, onnx_graph
from globloc_ros.placemap import MapError, PlaceMap, Refinement, load_map, query_features, recover, refine

# ------------------------------------------------------------------------------------------ metadata schema
# GRAPH_FORMAT, EXPORT_VERSION, INPUT_NAMES, OUTPUT_NAMES and graph_metadata: onnx_export, which writes them
ENGINE_FORMAT = 'globloc-tensorrt-engine'
ENGINE_SUFFIXES = ('.engine', '.plan', '.trt')
MIN_SPREAD_M = 1e-4  # camera points within 0.1 mm of each other cannot pin a rotation (all-zero weights give 1e-6)
COVARIANCE_UNKNOWN = 1e6  # variance (m^2, rad^2) reported when the outputs are not finite
BACKENDS = ('auto', 'tensorrt', 'onnxruntime', 'torch')
MAX_RESIDUAL_M = 0.25  # default confidence gate: weighted RMS alignment residual (m) ...
MIN_EFFECTIVE_POINTS = 10.0  # ... and effective point count (1 / sum w^2)
AMBIGUOUS = (0.25, 10.0)  # m, deg: a recovered pose this far from where the map also fits the frame is not published


class LocalizerError(RuntimeError):
    """A model, graph or engine that cannot be used here; raised at construction with the file named."""


@dataclass
class Result:
    """One localization.

    T_map_cam (4, 4) float64: the camera's optical frame in the map (X_map = R X_cam + t), metres.
    residual: weighted RMS alignment residual (m); n_eff: effective point count 1 / sum w^2;
    spread: weighted RMS distance (m) of the camera points from their centroid.
    confident: whether to trust the pose; reason: '' when confident, else why not.
    covariance (6, 6): x, y, z, roll, pitch, yaw order (align.pose_covariance).
    timings_ms: 'preprocess', 'network' (+ alignment for fused graphs), 'alignment' (where separable), 'total'.
    measured_depth: fraction of the cells whose depth came from the measured depth (0 without one).
    refinement: the refinement against the place map (placemap.Refinement; T_map_cam and covariance above are its
    own when it was accepted), None when not attempted (no map, or a pose that was not confident).
    path: how the pose came (PATHS): 'one-shot' (the network's pose, no map), 'refined' (against the map near the
    one-shot pose), 'tracked' (near the prior: the last pose, moved by odometry), 'recovered' (global recovery
    against the map), 'rejected' (no pose to publish: `reason` says why). T_one_shot (4, 4): the network's pose.
    """
    T_map_cam: np.ndarray
    residual: float
    n_eff: float
    spread: float
    confident: bool
    reason: str
    covariance: np.ndarray
    timings_ms: dict = field(default_factory=dict)
    measured_depth: float = 0.0
    refinement: Refinement | None = None
    path: str = 'one-shot'
    T_one_shot: np.ndarray | None = None


PATHS = ('one-shot', 'refined', 'tracked', 'recovered', 'rejected')


def check_graph_metadata(meta: dict[str, str], where: str) -> tuple[int, int]:
    """Validate the metadata of an exported graph (onnx_export.graph_metadata); returns its input size (W, H).
    Raises LocalizerError."""
    from globloc_ros.modelfile import FORMAT_VERSION
    if meta.get('globloc.format') != GRAPH_FORMAT:
        raise LocalizerError(f"{where}: no globloc metadata ('globloc.format' is {meta.get('globloc.format')!r}, "
                             f"expected {GRAPH_FORMAT!r}): export it with `globloc export`")
    version = meta.get('globloc.export_version')
    if version != str(EXPORT_VERSION):
        raise LocalizerError(f'{where}: export format version {version} is not supported (this build reads '
                             f'version {EXPORT_VERSION}); re-export it with `globloc export`')
    mversion = meta.get('globloc.model_format_version')
    if mversion != str(FORMAT_VERSION):
        raise LocalizerError(f'{where}: exported from model format version {mversion}, this build reads '
                             f'version {FORMAT_VERSION}; re-export it')
    try:
        W, H = (int(v) for v in json.loads(meta['globloc.input_size']))
        norm = json.loads(meta['globloc.normalisation'])
        std = np.asarray(norm['std'], dtype=np.float64)
        mean = np.asarray(norm['mean'], dtype=np.float64)
        sha = meta['globloc.model_sha256']
        stride = int(meta['globloc.stride'])
    except (KeyError, ValueError, TypeError) as e:
        raise LocalizerError(f'{where}: globloc metadata incomplete or malformed ({type(e).__name__}: {e}); '
                             're-export it') from e
    if W <= 0 or H <= 0 or mean.shape != (3,) or std.shape != (3,) or not (std > 0).all() \
            or not np.isfinite(mean).all() or len(sha) != 64 \
            or stride <= 0 or W % stride or H % stride:
        raise LocalizerError(f'{where}: globloc metadata out of range (input size {W}x{H}, stride {stride}, '
                             f'mean {mean.tolist()}, std {std.tolist()}, sha256 {sha!r}); re-export it')
    return W, H


def gpu_identity() -> dict | None:
    """{'name', 'compute_capability': 'major.minor'} of CUDA device 0, or None without a GPU."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {'name': torch.cuda.get_device_name(0), 'compute_capability': f'{major}.{minor}'}
    try:  # TensorRT can live beside a CPU-only torch
        out = subprocess.run(['nvidia-smi', '--query-gpu=name,compute_cap', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        name, cc = out.splitlines()[0].rsplit(',', 1)
        return {'name': name.strip(), 'compute_capability': cc.strip()}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def read_engine_metadata(engine_path: str | os.PathLike) -> dict:
    """The PATH.json beside an engine, with format and sha256 checked (no TensorRT needed)."""
    engine_path = Path(engine_path)
    meta_path = engine_path.with_name(engine_path.name + '.json')
    if not engine_path.is_file():
        raise LocalizerError(f'TensorRT engine not found: {engine_path}')
    if not meta_path.is_file():
        raise LocalizerError(f'{engine_path}: its metadata {meta_path.name} is missing (written by '
                             '`globloc export --format tensorrt` beside the engine)')
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise LocalizerError(f'{meta_path}: not readable JSON: {e}') from e
    if not isinstance(meta, dict) or meta.get('format') != ENGINE_FORMAT:
        raise LocalizerError(f"{meta_path}: not globloc engine metadata (no 'format': '{ENGINE_FORMAT}')")
    check_graph_metadata(meta.get('graph', {}), str(meta_path))
    sha = file_sha256(engine_path)
    if sha != meta.get('engine_sha256'):
        raise LocalizerError(f'{engine_path}: sha256 {sha[:12]}... does not match {meta_path.name} '
                             f'({str(meta.get("engine_sha256"))[:12]}...): truncated, corrupt or replaced engine')
    return meta


def check_engine_metadata(meta: dict, where: str, trt_version: str, gpu: dict | None) -> None:
    """An engine runs only on the TensorRT version and GPU it was built with: compare and explain."""
    built_gpu = meta.get('gpu') or {}
    built = f"TensorRT {meta.get('tensorrt_version')} on {built_gpu.get('name')} " \
            f"(compute capability {built_gpu.get('compute_capability')})"
    rebuild = 'rebuild it here with `globloc export --format tensorrt`'
    if meta.get('tensorrt_version') != trt_version:
        raise LocalizerError(f'{where}: engine built with {built}, but TensorRT {trt_version} is installed; {rebuild}')
    if gpu is None:
        raise LocalizerError(f'{where}: engine built for {built}, but no CUDA GPU is visible here')
    if gpu.get('compute_capability') != built_gpu.get('compute_capability') or gpu.get('name') != built_gpu.get('name'):
        raise LocalizerError(f"{where}: engine built for {built}, this GPU is {gpu.get('name')} (compute capability "
                             f"{gpu.get('compute_capability')}); {rebuild}")


# ------------------------------------------------------------------------------------------ frames
def check_frame(image: np.ndarray, K: np.ndarray) -> None:
    """Raise ValueError naming the problem unless image is (H, W, 3) uint8 and K a usable (3, 3) camera matrix."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f'image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}')
    if image.dtype != np.uint8:
        raise ValueError(f'image dtype must be uint8 (RGB 0..255), got {image.dtype}')
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f'image shape must be (H, W, 3) RGB, got {image.shape}')
    K = np.asarray(K)
    if K.shape != (3, 3):
        raise ValueError(f'K must be a (3, 3) camera matrix, got shape {K.shape}')
    if not np.issubdtype(K.dtype, np.number) or not np.all(np.isfinite(K)):
        raise ValueError(f'K must be finite, got {K.tolist()}')
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise ValueError(f'K focal lengths must be > 0, got fx={K[0, 0]:g}, fy={K[1, 1]:g}')


def preprocess(image: np.ndarray, K: np.ndarray, input_size: tuple[int, int],
               device: str | torch.device = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
    """The one pre-processing step of every backend.

    image (H, W, 3) uint8 RGB, K (3, 3) of that image, input_size (W, H) of the model ->
    image (1, 3, H', W') float32 RGB 0..255 and K (1, 3, 3) float32 of the resized image, on `device`.
    Resizing as the bag reader does for training (INTER_AREA when shrinking both axes, else INTER_LINEAR;
    K by frames.scale_intrinsics). The resize runs on the CPU in uint8 (cv2); for a CUDA device the small uint8
    image is then moved there and the layout change and float conversion happen on the GPU. No normalisation:
    the graph does it.
    """
    check_frame(image, K)
    W, H = input_size
    h, w = image.shape[:2]
    K = np.asarray(K, dtype=np.float64)
    if (w, h) != (W, H):
        sx, sy = W / w, H / h
        interp = cv2.INTER_AREA if sx < 1 and sy < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (W, H), interpolation=interp)
        K = scale_intrinsics(K, sx, sy)
    K_t = torch.from_numpy(K.astype(np.float32))[None]
    if torch.device(device).type == 'cpu':
        # numpy, single-threaded: waking torch's OpenMP pool right after an onnxruntime run costs ~1.5 ms here
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32))
        return x, K_t
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True)  # uint8: 4x less to move
    x = x.permute(2, 0, 1).unsqueeze(0).to(torch.float32, memory_format=torch.contiguous_format)
    return x, K_t.to(device)


def check_depth(depth: np.ndarray, image_shape: tuple[int, ...]) -> None:
    """Raise ValueError naming the problem unless depth is an (H', W') float array in metres covering the image
    (image_shape (H, W, ...)): the same size or the same aspect ratio within 1 %."""
    if not isinstance(depth, np.ndarray):
        raise ValueError(f'depth must be a numpy array (H, W) float metres, got {type(depth).__name__}')
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f'depth dtype must be float (metres), got {depth.dtype}; 16-bit depth images are '
                         'millimetres: pass depth / 1000.0')
    if depth.ndim != 2 or depth.shape[0] < 1 or depth.shape[1] < 1:
        raise ValueError(f'depth shape must be (H, W), got {depth.shape}')
    (hd, wd), (h, w) = depth.shape, image_shape[:2]
    if abs((wd / hd) / (w / h) - 1) > 0.01:
        raise ValueError(f'depth {wd}x{hd} is not registered to the {w}x{h} image (aspect ratios differ)')


def preprocess_depth(depth: np.ndarray | None, image_shape: tuple[int, ...], input_size: tuple[int, int],
                     stride: int, device: str | torch.device = 'cpu') -> tuple[torch.Tensor, float]:
    """A measured depth image -> the graph's depth input (1, 1, H'/stride, W'/stride) float32 metres at the cell
    centres of the resized image (input_size (W', H')), 0 where not measured, and the measured fraction of cells.

    depth (H, W) float metres registered to the image of shape image_shape; 0, negative, NaN and inf are
    'not measured'. Each cell takes a noise-robust median of the pixels about its centre; cells with too few of
    them or straddling a depth edge are not measured either (frames.measured_depth_at_cells). None: zeros.
    """
    W, H = input_size
    h, w = H // stride, W // stride
    if depth is None:
        return torch.zeros(1, 1, h, w, device=device), 0.0
    check_depth(depth, image_shape)
    d = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float32)
    cells = measured_depth_at_cells(d, W / d.shape[1], H / d.shape[0], h, w, stride)
    measured = np.isfinite(cells)
    cells = np.where(measured, cells, 0.0).astype(np.float32)
    return torch.from_numpy(cells)[None, None].to(device), float(measured.mean())


# ------------------------------------------------------------------------------------------ gating
def gate(T: np.ndarray, residual: float, n_eff: float, spread: float, max_residual_m: float,
         min_effective_points: float) -> tuple[bool, str]:
    """(confident, reason): confident = finite and alignment not degenerate and n_eff >= min_effective_points and
    residual <= max_residual_m.

    The fused graphs output (T, residual, n_eff, spread), not align's own flag, so "degenerate" is judged from
    those: n_eff < align.MIN_POINTS or spread <= MIN_SPREAD_M (zero or NaN weights end there). align's
    collinearity test is not available; camera points back-projected from a grid of cells are collinear only
    when the weight sits on ~2 cells, which n_eff catches.
    """
    if not (np.all(np.isfinite(T)) and np.isfinite(residual) and np.isfinite(n_eff) and np.isfinite(spread)):
        return False, 'non-finite pose'
    if n_eff < min_effective_points:
        return False, f'effective points {n_eff:.1f} < {min_effective_points:g}'
    if n_eff < _align.MIN_POINTS or spread <= MIN_SPREAD_M:
        return False, 'alignment degenerate'
    if residual > max_residual_m:
        return False, f'residual {residual:.2f} m > {max_residual_m:.2f} m'
    return True, ''


def covariance(residual: float, n_eff: float, spread: float) -> np.ndarray:
    """(6, 6) float64 from align.pose_covariance; a large diagonal where the outputs are not finite."""
    if not (np.isfinite(residual) and np.isfinite(n_eff) and np.isfinite(spread)):
        return np.eye(6) * COVARIANCE_UNKNOWN
    t = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    return _align.pose_covariance(t(residual), t(spread))[0].numpy()


def ambiguity(T_recovered: np.ndarray, fits: list[np.ndarray]) -> str:
    """Why a recovered pose T_map_cam (4, 4) must not go out, or ''. fits: the poses (4, 4) where the map also fits
    the frame, refined near the one-shot pose or the prior but not pinned in every direction (ICP along a
    corridor's walls). A recovered pose more than AMBIGUOUS from one of them means the place repeats itself along
    what is not pinned: either could be right, so neither is published."""
    far = [pose_errors(T_recovered, T_fit) for T_fit in fits]
    if any(t > AMBIGUOUS[0] or r > AMBIGUOUS[1] for t, r in far):
        t, r = min(far)
        return (f'recovered {float(t):.2f} m / {float(r):.1f} deg from where the map also fits the frame (not '
                f'pinned in all directions): ambiguous')
    return ''


# ------------------------------------------------------------------------------------------ backends
def pose_from_heads(net, scene: torch.Tensor, depth: torch.Tensor, logits: torch.Tensor, K: torch.Tensor,
                    measured_depth: torch.Tensor | None = None):
    """GlobLocNet.forward + PoseGraph after the heads, in float32: (T (B, 4, 4), residual, n_eff, spread).
    measured_depth (B, 1, h, w) as PoseGraph's depth input (0: use the depth head), or None.

    Split out so that the torch backend can time the network and the alignment apart and run the
    network in fp16 while the alignment stays fp32. test_runtime checks it equals PoseGraph exactly.
    """
    B, _, h, w = scene.shape
    weights = torch.softmax(logits, dim=1)
    uv = cell_centres(h, w, net.config.stride, device=scene.device, dtype=scene.dtype)
    cam = backproject(with_measured_depth(depth, measured_depth).flatten(1), uv, K)
    pose = _align.align_weighted(cam, scene.flatten(2).transpose(1, 2), weights, 'horn')
    T = torch.zeros(B, 4, 4, dtype=scene.dtype, device=scene.device)
    T[:, :3, :3] = pose.R
    T[:, :3, 3] = pose.t
    T[:, 3, 3] = 1.0
    return T, pose.residual, pose.n_eff, pose.spread


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


class _TorchBackend:
    """GlobLocNet in torch. CPU: eager fp32, network and alignment timed apart. CUDA: static input
    buffers and one captured CUDA graph (fp16 autocast network + fp32 alignment) replayed per frame."""

    def __init__(self, net, device: str, precision: str, threads: int | None):
        self.net = net.eval()
        self.device = device
        self.fp16 = precision == 'fp16'
        if threads:
            torch.set_num_threads(threads)
        self.graph = None
        if device == 'cuda':
            self.net.to('cuda')
            self._capture()

    def _heads(self, x: torch.Tensor, K: torch.Tensor):
        if self.device != 'cuda':  # the CPU path never touches CUDA, autocast included
            _, scene, depth, logits = self.net.heads(x, K)
            return scene, depth, logits
        # cache_enabled=False: autocast's weight cache does not mix with CUDA graph capture. fp32 means fp32:
        # cuDNN's TF32 convolutions (torch's default) are turned off for it.
        with torch.autocast('cuda', dtype=torch.float16, enabled=self.fp16, cache_enabled=False), \
                torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=self.fp16):
            _, scene, depth, logits = self.net.heads(x, K)
        return scene.float(), depth.float(), logits.float()

    def _full(self, x: torch.Tensor, K: torch.Tensor, d: torch.Tensor):
        return pose_from_heads(self.net, *self._heads(x, K), K, d)

    def _capture(self) -> None:
        W, H = self.net.config.input_size
        self.static_x = torch.full((1, 3, H, W), 127.0, device='cuda')
        self.static_K = torch.tensor([[[W, 0.0, (W - 1) / 2], [0.0, W, (H - 1) / 2], [0.0, 0.0, 1.0]]],
                                     device='cuda')
        stride = self.net.config.stride
        self.static_d = torch.zeros((1, 1, H // stride, W // stride), device='cuda')
        # The warm-up below settles cuDNN's algorithms (benchmark mode, set in _heads) before capture.
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._full(self.static_x, self.static_K, self.static_d)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self._full(self.static_x, self.static_K, self.static_d)
        torch.cuda.synchronize()

    @torch.no_grad()
    def infer(self, x: torch.Tensor, K: torch.Tensor, d: torch.Tensor):
        if self.graph is not None:
            t0 = time.perf_counter()
            self.static_x.copy_(x)
            self.static_K.copy_(K)
            self.static_d.copy_(d)
            self.graph.replay()
            outs = [o.cpu().numpy() for o in self.static_out]  # .cpu() waits for the replay
            return outs, {'network': _ms(t0, time.perf_counter())}
        t0 = time.perf_counter()
        heads = self._heads(x, K)
        t1 = time.perf_counter()
        outs = [o.numpy() for o in pose_from_heads(self.net, *heads, K, d)]
        return outs, {'network': _ms(t0, t1), 'alignment': _ms(t1, time.perf_counter())}


class _OrtBackend:
    """The exported PoseGraph in onnxruntime (network and alignment fused: one 'network' time)."""

    def __init__(self, onnx_path: Path, device: str, threads: int | None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads would otherwise spin after each frame, stealing cores from image decoding and
        # the ROS executor on small machines (measured: preprocess 6 -> 15 ms on 2 busy cores).
        opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ['CPUExecutionProvider']
        if device == 'cuda':
            providers.insert(0, 'CUDAExecutionProvider')
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            raise LocalizerError(f'{onnx_path}: onnxruntime cannot load it (corrupt or not ONNX?): '
                                 f'{type(e).__name__}: {e}') from e
        if device == 'cuda' and 'CUDAExecutionProvider' not in self.session.get_providers():
            raise LocalizerError(f'{onnx_path}: device cuda requested but onnxruntime has no CUDA provider here '
                                 f'(providers: {ort.get_available_providers()})')
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def infer(self, x: torch.Tensor, K: torch.Tensor, d: torch.Tensor):
        t0 = time.perf_counter()
        feed = {'image': x.cpu().numpy(), 'K': K.cpu().numpy(), 'depth': d.cpu().numpy()}
        outs = self.session.run(list(OUTPUT_NAMES), feed)
        return outs, {'network': _ms(t0, time.perf_counter())}


def _import_tensorrt(hint: str = 'run a .pt or .onnx model with backend onnxruntime or torch instead'):
    try:
        import tensorrt as trt
    except ImportError as e:
        raise LocalizerError(f'TensorRT is not installed (the `tensorrt` Python package, on a machine with an '
                             f'NVIDIA GPU); {hint}') from e
    return trt


class _TensorRTBackend:
    """A serialized engine of the PoseGraph ONNX, run with the TensorRT >= 8.6 tensor API
    (set_tensor_address / execute_async_v3); torch CUDA tensors hold the device buffers."""

    def __init__(self, engine_path: Path, meta: dict):
        trt = _import_tensorrt()
        check_engine_metadata(meta, str(engine_path), trt.__version__, gpu_identity())
        if not torch.cuda.is_available():
            raise LocalizerError(f'{engine_path}: the TensorRT backend keeps its buffers in torch CUDA tensors, '
                                 'and this torch has no CUDA')
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise LocalizerError(f'{engine_path}: TensorRT {trt.__version__} could not deserialize the engine')
        self.context = self.engine.create_execution_context()
        W, H = json.loads(meta['graph']['globloc.input_size'])
        stride = int(meta['graph']['globloc.stride'])
        shapes = {'image': (1, 3, H, W), 'K': (1, 3, 3), 'depth': (1, 1, H // stride, W // stride)}
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                  trt.bool: torch.bool}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(INPUT_NAMES + OUTPUT_NAMES):
            raise LocalizerError(f'{engine_path}: engine tensors {names}, expected {INPUT_NAMES + OUTPUT_NAMES}')
        for name in INPUT_NAMES:
            self.context.set_input_shape(name, shapes[name])
        self.buffers = {}
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device='cuda')
            self.context.set_tensor_address(name, buf.data_ptr())
            self.buffers[name] = buf

    def infer(self, x: torch.Tensor, K: torch.Tensor, d: torch.Tensor):
        t0 = time.perf_counter()
        stream = torch.cuda.current_stream()
        self.buffers['image'].copy_(x)
        self.buffers['K'].copy_(K)
        self.buffers['depth'].copy_(d)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError('TensorRT execute_async_v3 failed')
        outs = [self.buffers[n].float().cpu().numpy() for n in OUTPUT_NAMES]
        return outs, {'network': _ms(t0, time.perf_counter())}


# ------------------------------------------------------------------------------------------ the localizer
def default_cache_dir() -> Path:
    return Path(os.environ.get('GLOBLOC_CACHE') or Path.home() / '.cache' / 'globloc')


def _ort_available() -> tuple[bool, bool]:
    """(onnxruntime importable, its CUDA provider present)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, False
    return True, 'CUDAExecutionProvider' in ort.get_available_providers()


def code_fingerprint() -> str:
    """12 hex digits over the code that shapes the exported graph (net, align, frames), the export format
    version and the torch version: a cached ONNX is rebuilt when any of them changes, not only the weights."""
    from globloc_ros import frames, net
    h = hashlib.sha256(f'{EXPORT_VERSION} {torch.__version__}'.encode())
    for module in (net, _align, frames):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:12]


def cached_onnx(model_path: Path, sha: str, cache_dir: Path) -> Path:
    """The PoseGraph ONNX of a model file, exported once into cache_dir/<model sha256>-<code_fingerprint>.onnx
    (atomic write, so concurrent starts never see half a file)."""
    path = cache_dir / f'{sha}-{code_fingerprint()}.onnx'
    if path.is_file():
        try:
            import onnx
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            if meta.get('globloc.model_sha256') == sha:
                check_graph_metadata(meta, str(path))
                return path
        except Exception:  # noqa: BLE001 - a damaged cache entry is simply rebuilt
            pass
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=cache_dir)
        os.close(fd)
    except OSError as e:
        raise LocalizerError(f'{model_path}: cannot write the onnxruntime cache in {cache_dir} ({e}); set '
                             'GLOBLOC_CACHE to a writable folder, or export once with `globloc export --format onnx` '
                             'and give the .onnx file') from e
    try:
        data = onnx_graph(model_path)[0].SerializeToString()
        atomic_write(tmp, lambda f: f.write(data))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable like any exported file
        os.replace(tmp, path)
    except (ValueError, RuntimeError, OSError) as e:
        raise LocalizerError(f'{model_path}: ONNX export for onnxruntime failed: {e}') from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _check_arguments(backend: str, device: str | None, precision: str | None, threads: int | None,
                     max_residual_m: float, min_effective_points: float) -> None:
    """Localizer's arguments, before any file is opened: ValueError naming the bad one."""
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if device not in (None, 'cpu', 'cuda'):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if precision not in (None, 'fp32', 'fp16'):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if threads is not None and threads < 1:
        raise ValueError(f'threads must be >= 1 or None, got {threads}')
    if not (max_residual_m > 0 and min_effective_points >= 0):
        raise ValueError(f'max_residual_m must be > 0 and min_effective_points >= 0, got '
                         f'{max_residual_m}, {min_effective_points}')


def model_kind(path: Path) -> str:
    """'engine' (.engine / .plan / .trt), 'onnx' (.onnx) or 'model' (a model file, .pt), by the file's suffix."""
    return 'engine' if path.suffix in ENGINE_SUFFIXES else 'onnx' if path.suffix == '.onnx' else 'model'


KIND_NAMES = {'model': 'model files (.pt)', 'onnx': 'ONNX graphs (.onnx)', 'engine': 'TensorRT engines (.engine)'}
BACKEND_RUNS = {'tensorrt': ('engine',), 'onnxruntime': ('model', 'onnx'), 'torch': ('model',)}  # kinds


def choose_backend(kind: str, backend: str, device: str | None, ort_ok: bool, ort_cuda: bool, torch_cuda: bool,
                   where: str = 'file') -> tuple[str, str]:
    """(backend, device) that run a file of `kind` (model_kind) here; LocalizerError when none can as asked.

    backend 'auto': tensorrt for an engine, onnxruntime for an ONNX graph; for a model file torch on CUDA (unless
    device is 'cpu'), else onnxruntime where installed, else torch on the CPU. device None: 'cuda' where the
    backend can use a GPU here, else 'cpu'; engines always run on CUDA. ort_ok: onnxruntime importable; ort_cuda:
    with its CUDA provider; torch_cuda: torch sees a CUDA GPU. where: the file, as error messages name it.
    """
    if device == 'cuda' and not (torch_cuda or ort_cuda):
        raise LocalizerError('device cuda requested but neither torch nor onnxruntime sees a CUDA GPU here')
    if backend == 'auto':
        if kind == 'engine':
            backend = 'tensorrt'
        elif kind == 'onnx':
            backend = 'onnxruntime'
        elif device != 'cpu' and torch_cuda:
            backend = 'torch'
        elif ort_ok:
            backend = 'onnxruntime'
        else:
            backend = 'torch'
    if device is None:  # the GPU where this backend can use one
        device = 'cuda' if {'tensorrt': True, 'torch': torch_cuda, 'onnxruntime': ort_cuda}[backend] else 'cpu'
    runs = BACKEND_RUNS[backend]
    if kind not in runs:
        raise LocalizerError(f'{where}: backend {backend} cannot run {KIND_NAMES[kind]}; it runs '
                             f"{' and '.join(KIND_NAMES[k] for k in runs)} (engines come from "
                             '`globloc export --format tensorrt`)')
    if backend == 'onnxruntime' and not ort_ok:
        raise LocalizerError('onnxruntime is not installed')
    if backend == 'torch' and device == 'cuda' and not torch_cuda:
        raise LocalizerError('device cuda requested for the torch backend, but this torch has no CUDA')
    if backend == 'tensorrt':
        device = 'cuda'
    return backend, device


def _open_place_map(place_map: str | os.PathLike | PlaceMap | None) -> PlaceMap | None:
    """The map a Localizer refines against, loaded and its search trees built now, not at the first frame."""
    try:
        place_map = place_map if place_map is None or isinstance(place_map, PlaceMap) else load_map(place_map)
        if place_map is not None:
            place_map.build_search_trees()
    except MapError as e:
        raise LocalizerError(str(e)) from e
    return place_map


class Localizer:
    """Image + K -> Result, with one backend chosen and checked at construction.

    model_path: .pt model file, .onnx graph, or .engine/.plan/.trt TensorRT engine (+ PATH.json).
    device is ignored for engines (always CUDA).
    backend: 'auto' | 'tensorrt' | 'onnxruntime' | 'torch'. device: 'cpu' | 'cuda' | None (CUDA where the backend
    can use it here: torch with CUDA, onnxruntime with its CUDA provider).
    threads: CPU threads of the backend (None: its default; for torch this sets torch's global thread count).
    precision: 'fp32' | 'fp16' | None (fp16 for torch on CUDA and for engines as built, else fp32).
    A pose is confident when finite, not degenerate, n_eff >= min_effective_points and
    residual <= max_residual_m. Raises LocalizerError (files, versions, unavailable backends) or ValueError
    (arguments).
    place_map: a map file (`globloc map`) or PlaceMap: confident poses are then refined against it (placemap.refine:
    ICP with a depth image, else image features); when that is refused, or the one-shot pose is not confident, the
    pose is tracked from a prior (localize's `prior`) or recovered globally (placemap.recover). None: the one-shot
    pose as is. publish_unverified: with a map, whether a confident one-shot pose that no refinement verified is
    still returned as confident (default False: with a map, only poses the map pins are published).
    """

    def __init__(self, model_path, backend: str = 'auto', device: str | None = None, threads: int | None = None,
                 max_residual_m: float = MAX_RESIDUAL_M, min_effective_points: float = MIN_EFFECTIVE_POINTS,
                 precision: str | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 place_map: str | os.PathLike | PlaceMap | None = None, publish_unverified: bool = False):
        _check_arguments(backend, device, precision, threads, max_residual_m, min_effective_points)
        path = Path(model_path)
        self.model_path = path
        self.max_residual_m = float(max_residual_m)
        self.min_effective_points = float(min_effective_points)
        self.threads = threads
        self.publish_unverified = bool(publish_unverified)
        kind = model_kind(path)
        backend, device = choose_backend(kind, backend, device, *_ort_available(), torch.cuda.is_available(),
                                         where=str(path))
        if precision == 'fp16' and not (backend == 'tensorrt' or (backend == 'torch' and device == 'cuda')):
            raise LocalizerError(f'precision fp16 needs the tensorrt backend or torch on CUDA (got {backend} '
                                 f'on {device}); use fp32')
        if not path.is_file():
            raise LocalizerError(f'model file not found: {path}')
        self.place_map = _open_place_map(place_map)
        if kind == 'model':
            precision = self._open_model(path, backend, device, precision, cache_dir)
        elif kind == 'onnx':
            self._open_onnx(path, device)
        else:
            precision = self._open_engine(path, precision)
        self.backend = backend
        self.device = device
        self.precision = precision or 'fp32'
        self._tensor_device = 'cuda' if (device == 'cuda' and backend in ('torch', 'tensorrt')) else 'cpu'

    def _open_model(self, path: Path, backend: str, device: str, precision: str | None,
                    cache_dir: str | os.PathLike | None) -> str | None:
        """A model file: torch runs its network; onnxruntime its ONNX export, made once into the cache (cached_onnx).
        Returns the precision (torch: fp16 on CUDA unless asked otherwise)."""
        from globloc_ros.modelfile import ModelFileError, load_model
        try:
            net, meta = load_model(path)
        except ModelFileError as e:
            raise LocalizerError(str(e)) from e
        self.metadata = {'config': net.config.to_dict(), 'meta': meta}
        self.input_size = tuple(net.config.input_size)
        self.stride = net.config.stride
        if backend == 'torch':
            precision = precision or ('fp16' if device == 'cuda' else 'fp32')
            self._impl = _TorchBackend(net, device, precision, self.threads)
        else:
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            self.onnx_path = cached_onnx(path, file_sha256(path), cache)
            self._impl = _OrtBackend(self.onnx_path, device, self.threads)
        return precision

    def _open_onnx(self, path: Path, device: str) -> None:
        """An ONNX graph (`globloc export --format onnx`): its metadata checked, and its inputs against them."""
        self._impl = _OrtBackend(path, device, self.threads)
        self.metadata = self._impl.metadata
        self.input_size = check_graph_metadata(self.metadata, str(path))
        self.stride = int(self.metadata['globloc.stride'])
        inp = {i.name: i.shape for i in self._impl.session.get_inputs()}
        W, H = self.input_size
        h, w = H // self.stride, W // self.stride
        if set(inp) != set(INPUT_NAMES) or list(inp['image'][1:]) != [3, H, W] \
                or list(inp['depth'][1:]) != [1, h, w]:
            raise LocalizerError(f'{path}: graph inputs {inp} do not match its metadata '
                                 f'(image (B, 3, {H}, {W}), K (B, 3, 3), depth (B, 1, {h}, {w}))')

    def _open_engine(self, path: Path, precision: str | None) -> str:
        """A TensorRT engine with its PATH.json; returns the precision it was built for (another one asked: error)."""
        meta = read_engine_metadata(path)
        self.metadata = meta
        self.input_size = check_graph_metadata(meta['graph'], str(path))
        self.stride = int(meta['graph']['globloc.stride'])
        built = meta.get('precision', 'fp32')
        if precision not in (None, built):
            raise LocalizerError(f'{path}: engine was built for {built}, {precision} requested; '
                                 f'build another with `globloc export --format tensorrt --precision {precision}`')
        self._impl = _TensorRTBackend(path, meta)
        return built

    def localize(self, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None = None,
                 prior: tuple[np.ndarray, np.ndarray] | None = None) -> Result:
        """image (H, W, 3) uint8 RGB at any size, K (3, 3) of that image -> Result.
        depth (H', W') float metres registered to the image (RGB-D; 0 or NaN where not measured), optional: where
        given, it replaces the depth head's depth in the alignment (preprocess_depth).
        prior: (T_map_cam (4, 4), covariance (6, 6)) expected for this frame (a stream's last pose moved by
        odometry), optional: with a map, refined from when the one-shot pose is not confident or not verified.
        Raises ValueError for a bad frame (dtype, shape, non-finite K, non-positive focal length, depth not
        float or not registered to the image)."""
        cuda = self._tensor_device == 'cuda'
        t0 = time.perf_counter()
        x, Kt = preprocess(image, K, self.input_size, self._tensor_device)
        d, measured = preprocess_depth(depth, image.shape, self.input_size, self.stride, self._tensor_device)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        (T, residual, n_eff, spread), stages = self._impl.infer(x, Kt, d)
        T = np.asarray(T[0], dtype=np.float64)
        residual, n_eff, spread = float(residual[0]), float(n_eff[0]), float(spread[0])
        confident, reason = gate(T, residual, n_eff, spread, self.max_residual_m, self.min_effective_points)
        cov = covariance(residual, n_eff, spread)
        timings = {'preprocess': _ms(t0, t1), **stages}
        refinement, path, T_one_shot = None, 'one-shot' if confident else 'rejected', T
        if self.place_map is not None:
            t2 = time.perf_counter()
            refinement, path, why = self._against_map(T, cov, confident, image, np.asarray(K, np.float64), depth,
                                                      prior)
            if refinement is not None and refinement.accepted:
                T, cov = refinement.T_map_cam, refinement.covariance
            elif confident and not self.publish_unverified:
                reason = f'not verified against the map: {why}'
            elif not confident:
                reason = f'{reason}; {why}'
            timings['refine'] = _ms(t2, time.perf_counter())
        timings['total'] = _ms(t0, time.perf_counter())
        return Result(T, residual, n_eff, spread, path != 'rejected', reason if path == 'rejected' else '', cov,
                      timings, measured, refinement, path, T_one_shot)

    def _against_map(self, T: np.ndarray, cov: np.ndarray, confident: bool, image: np.ndarray, K: np.ndarray,
                     depth: np.ndarray | None, prior: tuple[np.ndarray, np.ndarray] | None
                     ) -> tuple[Refinement | None, str, str]:
        """(the deciding refinement or None, path, why nothing was accepted): refine near the one-shot pose when it
        is confident, else near the prior, else recover globally."""
        starts = ([('refined', T, cov)] if confident else []) + ([('tracked', *prior)] if prior is not None else [])
        features = cache(lambda: query_features(self.place_map, image))  # detected once, where first matched
        refinement, reasons, fits = None, [], []
        for path, T0, cov0 in starts:
            refinement = refine(self.place_map, np.asarray(T0, np.float64), image, K, depth, np.asarray(cov0),
                                features)
            if refinement is None:
                break  # the map has nothing this frame can be refined against
            # A direction the map does not pin (ICP against one wall) keeps the pose it started from: not verified
            if refinement.accepted and refinement.constrained == 6:
                return refinement, path, ''
            if refinement.accepted:
                fits.append(refinement.T_map_cam)
            reasons.append(f'{path}: {refinement.reason or f"{refinement.constrained} of 6 directions pinned"}')
        if refinement is not None or not starts:
            refinement = recover(self.place_map, image, K, depth, features=features)
            if refinement.accepted and (why := ambiguity(refinement.T_map_cam, fits)):
                refinement.accepted, refinement.reason = False, why
            if refinement.accepted:
                return refinement, 'recovered', ''
            reasons.append(f'recovery: {refinement.reason}')
        path = 'one-shot' if confident and self.publish_unverified else 'rejected'
        return refinement, path, '; '.join(reasons) or 'the map has nothing to refine against'
