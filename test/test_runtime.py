"""Localizer: backends agree, auto choice, load-time checks, bad frames, confidence gating, CUDA graph."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from globloc import export as ex
from globloc_ros import runtime as rt
from globloc_ros.frames import rotation_error_deg
from globloc_ros.modelfile import load_model, save_model
from globloc_ros.net import GlobLocNet, NetConfig, PoseGraph


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('model') / 'seeded.pt'
    save_model(GlobLocNet(NetConfig()), path, meta={'seed': 0})
    return path


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def frames():
    """Two real 640x480 frames (camera size: the Localizer resizes them) of sun3d_frag1; synthetic ones when
    the shared bags are absent (test_export insists on the real ones)."""
    bag = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'bags' / 'sun3d_frag1'
    if not bag.is_dir():
        return ex.synthetic_check_frames((640, 480), n=2)
    from globloc.bags import read_sequence
    seq = read_sequence(bag, max_frames=12, progress=False)
    return [(f.image, f.K) for f in (seq.frames[0], seq.frames[11])]


@pytest.fixture(scope='module')
def ort_localizer(model_file, cache_dir):
    return rt.Localizer(model_file, backend='onnxruntime', device='cpu', threads=2, cache_dir=cache_dir,
                        max_residual_m=1.0)


@pytest.fixture(scope='module')
def torch_localizer(model_file):
    return rt.Localizer(model_file, backend='torch', device='cpu', max_residual_m=1.0)


@pytest.fixture(scope='module')
def depth_image(frames):
    """Recorded depth (480, 640) metres, NaN where the sensor saw nothing, of frames[0]: sun3d_frag1's; a tilted
    plane with a hole when the shared bags are absent."""
    bag = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'bags' / 'sun3d_frag1'
    if bag.is_dir():
        from globloc.bags import read_sequence
        return read_sequence(bag, max_frames=1, progress=False).frames[0].depth
    depth = np.tile(np.linspace(1.5, 3.0, 480, dtype=np.float32)[:, None], (1, 640))
    depth[100:200, 300:400] = np.nan
    return depth


def test_pose_from_heads_equals_pose_graph(model_file, frames):
    net, _ = load_model(model_file)
    x, K = rt.preprocess(*frames[0], net.config.input_size)
    measured = torch.zeros(1, 1, 30, 40)
    measured[..., :20] = 2.0  # the left half measured, the right half the depth head's
    for d in (torch.zeros(1, 1, 30, 40), measured):
        with torch.no_grad():
            _, scene, depth, logits = net.heads(x, K)
            split = rt.pose_from_heads(net, scene, depth, logits, K, d)
            fused = PoseGraph(net)(x, K, d)
        for a, b in zip(split, fused):
            assert torch.equal(a, b)


def test_preprocess_resizes_and_scales_K(frames):
    image, K = frames[0]
    x, Kt = rt.preprocess(image, K, (320, 240))
    assert x.shape == (1, 3, 240, 320) and x.dtype == torch.float32 and x.is_contiguous()
    assert 0 <= x.min() and x.max() <= 255 and x.max() > 100  # 0..255, not normalised
    assert Kt.shape == (1, 3, 3)
    assert np.allclose(Kt[0].numpy(), [[K[0, 0] / 2, 0, (K[0, 2] + 0.5) / 2 - 0.5],
                                       [0, K[1, 1] / 2, (K[1, 2] + 0.5) / 2 - 0.5], [0, 0, 1]], atol=1e-4)
    same, _ = rt.preprocess(image, K, (640, 480))  # no resize at the input size: exact pixels
    assert torch.equal(same[0].permute(1, 2, 0), torch.from_numpy(image).float())


def test_torch_and_onnxruntime_give_the_same_pose(ort_localizer, torch_localizer, frames):
    for image, K in frames:
        a, b = ort_localizer.localize(image, K), torch_localizer.localize(image, K)
        assert a.T_map_cam.dtype == np.float64 and a.T_map_cam.shape == (4, 4)
        assert np.abs(a.T_map_cam[:3, 3] - b.T_map_cam[:3, 3]).max() < 1e-4
        assert rotation_error_deg(a.T_map_cam[:3, :3], b.T_map_cam[:3, :3]) < 1e-3
        assert a.residual == pytest.approx(b.residual, abs=1e-5)
        assert a.n_eff == pytest.approx(b.n_eff, rel=1e-4) and a.spread == pytest.approx(b.spread, abs=1e-5)
        assert (a.confident, a.reason) == (b.confident, b.reason)
        assert a.covariance.shape == (6, 6) and np.all(np.isfinite(a.covariance))
    assert set(a.timings_ms) == {'preprocess', 'network', 'total'}
    assert set(b.timings_ms) == {'preprocess', 'network', 'alignment', 'total'}
    assert b.timings_ms['total'] >= b.timings_ms['network'] + b.timings_ms['alignment']


def test_measured_depth_replaces_the_depth_head(ort_localizer, torch_localizer, frames, depth_image):
    image, K = frames[0]
    mono = torch_localizer.localize(image, K)
    cells, fraction = rt.preprocess_depth(depth_image, image.shape, (320, 240), 8)
    assert cells.shape == (1, 1, 30, 40) and (cells >= 0).all() and 0.5 < fraction < 1.0  # real depth has holes
    assert fraction == pytest.approx(float((cells > 0).float().mean()))
    rgbd = [lz.localize(image, K, depth_image) for lz in (torch_localizer, ort_localizer)]
    for r in rgbd:
        assert r.measured_depth == fraction and mono.measured_depth == 0.0
        assert np.abs(r.T_map_cam[:3, 3] - mono.T_map_cam[:3, 3]).max() > 1e-3  # the depth made a difference
    assert np.abs(rgbd[0].T_map_cam - rgbd[1].T_map_cam).max() < 1e-4  # the same in both backends
    # Millimetres of a 16UC1 image (0 = no reading) converted to metres: the same pose.
    mm = np.nan_to_num(depth_image * 1000).round().astype(np.uint16)
    assert np.abs(torch_localizer.localize(image, K, mm / 1000.0).T_map_cam - rgbd[0].T_map_cam).max() < 1e-3
    # Nothing measured (zeros, NaN): the depth head everywhere, exactly the monocular pose.
    for empty in (np.zeros_like(depth_image), np.full_like(depth_image, np.nan)):
        r = torch_localizer.localize(image, K, empty)
        assert r.measured_depth == 0.0 and np.array_equal(r.T_map_cam, mono.T_map_cam)
    # A depth image at half the resolution, registered to the same image: sampled at the same places.
    half, _ = rt.preprocess_depth(depth_image[::2, ::2].copy(), image.shape, (320, 240), 8)
    both = (half > 0) & (cells > 0)
    assert both.float().mean() > 0.5 and (half - cells)[both].abs().median() < 0.02


@pytest.mark.parametrize('depth, match', [
    (np.ones((480, 640), np.uint16), r'float \(metres\), got uint16.*depth / 1000'),
    (np.ones((480, 640, 1), np.float32), r'shape must be \(H, W\)'),
    (np.ones((480, 480), np.float32), 'not registered to the 640x480 image'),
    ([[1.0]], 'numpy array'),
])
def test_bad_depth_raises_value_error(torch_localizer, frames, depth, match):
    with pytest.raises(ValueError, match=match):
        torch_localizer.localize(*frames[0], depth)


def test_onnx_cache_is_reused_and_rebuilt_when_damaged(ort_localizer, model_file, cache_dir):
    cached = ort_localizer.onnx_path
    assert cached.parent == cache_dir and cached.name == f'{rt.file_sha256(model_file)}-{rt.code_fingerprint()}.onnx'
    stamp = cached.stat().st_mtime_ns
    rt.Localizer(model_file, backend='onnxruntime', cache_dir=cache_dir)
    assert cached.stat().st_mtime_ns == stamp  # reused, not re-exported
    cached.write_bytes(b'garbage')
    lz = rt.Localizer(model_file, backend='onnxruntime', cache_dir=cache_dir)
    assert lz.onnx_path == cached and cached.stat().st_size > 100_000


def test_unwritable_cache_is_a_clear_error(model_file, tmp_path):
    blocker = tmp_path / 'not_a_folder'
    blocker.write_text('x')
    with pytest.raises(rt.LocalizerError, match='cannot write the onnxruntime cache .* GLOBLOC_CACHE'):
        rt.Localizer(model_file, backend='onnxruntime', cache_dir=blocker / 'cache')


def test_default_device_is_the_backends_own(model_file, cache_dir, monkeypatch):
    # A GPU machine whose onnxruntime has only the CPU provider (seen on an H200): onnxruntime runs on the CPU
    # instead of failing for want of a CUDA provider.
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(rt, '_ort_available', lambda: (True, False))
    lz = rt.Localizer(model_file, backend='onnxruntime', cache_dir=cache_dir)
    assert (lz.backend, lz.device) == ('onnxruntime', 'cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA present: auto picks torch on CUDA there')
def test_auto_picks_onnxruntime_here(model_file, cache_dir, ort_localizer):
    lz = rt.Localizer(model_file, cache_dir=cache_dir)
    assert (lz.backend, lz.device, lz.precision, lz.input_size) == ('onnxruntime', 'cpu', 'fp32', (320, 240))
    onnx_lz = rt.Localizer(ort_localizer.onnx_path)  # an .onnx file directly
    assert onnx_lz.backend == 'onnxruntime' and onnx_lz.input_size == (320, 240)


def test_exported_onnx_file_runs_with_metadata_checked(model_file, frames, tmp_path, torch_localizer):
    path = tmp_path / 'm.onnx'
    ex.export_onnx(model_file, path, verify=False)
    lz = rt.Localizer(path, max_residual_m=1.0)
    assert lz.metadata['globloc.model_sha256'] == rt.file_sha256(model_file)
    a, b = lz.localize(*frames[1]), torch_localizer.localize(*frames[1])
    assert np.abs(a.T_map_cam[:3, 3] - b.T_map_cam[:3, 3]).max() < 1e-4


# ------------------------------------------------------------------------------------------ backend choice
# (kind, backend, device, ort_ok, ort_cuda, torch_cuda) -> (backend, device), or the LocalizerError it raises
BACKEND_TABLE = [
    # auto, model file: torch on CUDA, else onnxruntime (on its CUDA provider where it has one), else torch on CPU
    (('model', 'auto', None, True, False, False), ('onnxruntime', 'cpu')),
    (('model', 'auto', None, False, False, False), ('torch', 'cpu')),
    (('model', 'auto', None, True, True, True), ('torch', 'cuda')),
    (('model', 'auto', 'cpu', True, True, True), ('onnxruntime', 'cpu')),
    (('model', 'auto', 'cpu', False, False, True), ('torch', 'cpu')),
    (('model', 'auto', None, True, True, False), ('onnxruntime', 'cuda')),
    (('model', 'auto', 'cuda', True, True, False), ('onnxruntime', 'cuda')),
    # auto, exported files: their one backend; engines always on CUDA
    (('onnx', 'auto', None, True, False, True), ('onnxruntime', 'cpu')),
    (('onnx', 'auto', None, True, True, False), ('onnxruntime', 'cuda')),
    (('engine', 'auto', None, False, False, False), ('tensorrt', 'cuda')),
    (('engine', 'auto', 'cpu', False, False, True), ('tensorrt', 'cuda')),
    # asked for: device None is the backend's own GPU where it can use one (an onnxruntime without the CUDA
    # provider on a GPU machine runs on the CPU)
    (('model', 'onnxruntime', None, True, False, True), ('onnxruntime', 'cpu')),
    (('model', 'torch', None, True, False, True), ('torch', 'cuda')),
    (('model', 'torch', 'cpu', True, True, True), ('torch', 'cpu')),
    (('engine', 'tensorrt', None, False, False, False), ('tensorrt', 'cuda')),
    # refused
    (('model', 'tensorrt', None, True, True, True), 'm: backend tensorrt cannot run model files'),
    (('onnx', 'torch', None, True, True, True), r'm: backend torch cannot run ONNX graphs \(.onnx\); it runs model'),
    (('engine', 'onnxruntime', None, True, True, True), 'backend onnxruntime cannot run TensorRT engines'),
    (('model', 'onnxruntime', None, False, False, False), 'onnxruntime is not installed'),
    (('model', 'auto', 'cuda', True, False, False), 'neither torch nor onnxruntime sees a CUDA GPU'),
    (('engine', 'auto', 'cuda', False, False, False), 'neither torch nor onnxruntime sees a CUDA GPU'),
    (('model', 'torch', 'cuda', True, True, False), 'this torch has no CUDA'),
]


@pytest.mark.parametrize('args, expect', BACKEND_TABLE, ids=lambda v: '-'.join(map(str, v)) if isinstance(v, tuple)
                         else None)
def test_choose_backend(args, expect):
    if isinstance(expect, str):
        with pytest.raises(rt.LocalizerError, match=expect):
            rt.choose_backend(*args, where='m')
    else:
        assert rt.choose_backend(*args, where='m') == expect


def test_model_kind_by_suffix():
    kinds = {name: rt.model_kind(Path(name)) for name in ('a.pt', 'b.onnx', 'c.engine', 'd.plan', 'e.trt', 'f')}
    assert kinds == {'a.pt': 'model', 'b.onnx': 'onnx', 'c.engine': 'engine', 'd.plan': 'engine',
                     'e.trt': 'engine', 'f': 'model'}


# ------------------------------------------------------------------------------------------ load-time errors
def test_model_file_errors_at_construction(model_file, tmp_path, cache_dir):
    with pytest.raises(rt.LocalizerError, match='not found'):
        rt.Localizer(tmp_path / 'missing.pt')
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(model_file.read_bytes()[:5000])
    for backend in ('torch', 'onnxruntime'):
        with pytest.raises(rt.LocalizerError, match='truncated.pt'):
            rt.Localizer(truncated, backend=backend, cache_dir=cache_dir)
    foreign = tmp_path / 'foreign.pt'
    torch.save({'weights': torch.zeros(3)}, foreign)
    with pytest.raises(rt.LocalizerError, match='not a globloc model'):
        rt.Localizer(foreign)
    d = torch.load(model_file, weights_only=True)
    d['version'] = 7
    torch.save(d, tmp_path / 'future.pt')
    with pytest.raises(rt.LocalizerError, match='version 7'):
        rt.Localizer(tmp_path / 'future.pt')
    with pytest.raises(rt.LocalizerError, match='backend tensorrt cannot run model files'):
        rt.Localizer(model_file, backend='tensorrt')
    with pytest.raises(rt.LocalizerError, match='fp16 needs'):
        rt.Localizer(model_file, backend='onnxruntime', device='cpu', precision='fp16', cache_dir=cache_dir)
    with pytest.raises(ValueError, match='backend must be'):
        rt.Localizer(model_file, backend='openvino')


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA present')
def test_cuda_requested_without_cuda(model_file):
    with pytest.raises(rt.LocalizerError, match='cuda'):
        rt.Localizer(model_file, backend='torch', device='cuda')


def _retag(src, dst, **changes):
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        props.pop(k)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


def test_onnx_errors_at_construction(ort_localizer, tmp_path):
    good = ort_localizer.onnx_path
    with pytest.raises(rt.LocalizerError, match='no globloc metadata'):
        rt.Localizer(_retag(good, tmp_path / 'plain.onnx', **{'globloc.format': None}))
    with pytest.raises(rt.LocalizerError, match='export format version 99 is not supported'):
        rt.Localizer(_retag(good, tmp_path / 'v99.onnx', **{'globloc.export_version': '99'}))
    with pytest.raises(rt.LocalizerError, match='incomplete or malformed'):
        rt.Localizer(_retag(good, tmp_path / 'nosize.onnx', **{'globloc.input_size': None}))
    with pytest.raises(rt.LocalizerError, match='do not match its metadata'):
        rt.Localizer(_retag(good, tmp_path / 'size.onnx', **{'globloc.input_size': '[640, 480]'}))
    truncated = tmp_path / 'truncated.onnx'
    truncated.write_bytes(good.read_bytes()[:20000])
    with pytest.raises(rt.LocalizerError, match='truncated.onnx'):
        rt.Localizer(truncated)
    with pytest.raises(rt.LocalizerError, match=r'backend torch cannot run ONNX graphs \(.onnx\); it runs model files'):
        rt.Localizer(good, backend='torch')


def _fake_engine(tmp_path, ort_localizer, **changes):
    engine = tmp_path / 'fake.engine'
    engine.write_bytes(b'not really an engine')
    graph = {p.key: p.value for p in onnx.load(str(ort_localizer.onnx_path)).metadata_props}
    meta = {'format': rt.ENGINE_FORMAT, 'graph': graph, 'precision': 'fp16', 'tensorrt_version': '10.3.0',
            'gpu': {'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'},
            'engine_sha256': rt.file_sha256(engine), **changes}
    (tmp_path / 'fake.engine.json').write_text(json.dumps(meta))
    return engine, meta


def test_engine_metadata_checks(tmp_path, ort_localizer):
    engine, meta = _fake_engine(tmp_path, ort_localizer)
    assert rt.read_engine_metadata(engine)['tensorrt_version'] == '10.3.0'
    here = {'name': 'NVIDIA H100 80GB HBM3', 'compute_capability': '9.0'}
    rt.check_engine_metadata(meta, 'e', '10.3.0', here)  # the matching machine passes
    with pytest.raises(rt.LocalizerError, match=r'built with TensorRT 10\.3\.0 .* but TensorRT 10\.9\.0 is installed'):
        rt.check_engine_metadata(meta, 'e', '10.9.0', here)
    with pytest.raises(rt.LocalizerError, match=r'this GPU is NVIDIA A100.*compute capability 8\.0'):
        rt.check_engine_metadata(meta, 'e', '10.3.0', {'name': 'NVIDIA A100-SXM4-40GB', 'compute_capability': '8.0'})
    with pytest.raises(rt.LocalizerError, match='no CUDA GPU'):
        rt.check_engine_metadata(meta, 'e', '10.3.0', None)
    # damaged or missing pieces are found without TensorRT
    engine.write_bytes(b'not really an engine, truncated')
    with pytest.raises(rt.LocalizerError, match='sha256 .* does not match'):
        rt.Localizer(engine)
    (tmp_path / 'fake.engine.json').unlink()
    with pytest.raises(rt.LocalizerError, match='fake.engine.json is missing'):
        rt.Localizer(engine)
    with pytest.raises(rt.LocalizerError, match='TensorRT engine not found'):
        rt.read_engine_metadata(tmp_path / 'none.engine')
    engine2, _ = _fake_engine(tmp_path, ort_localizer, graph={})
    with pytest.raises(rt.LocalizerError, match='no globloc metadata'):
        rt.Localizer(engine2)


def test_engine_without_tensorrt_is_a_clear_error(tmp_path, ort_localizer):
    try:
        import tensorrt  # noqa: F401
        pytest.skip('TensorRT is installed')
    except ImportError:
        pass
    engine, _ = _fake_engine(tmp_path, ort_localizer)
    with pytest.raises(rt.LocalizerError, match='TensorRT is not installed'):
        rt.Localizer(engine)
    with pytest.raises(rt.LocalizerError, match='backend onnxruntime cannot run TensorRT engines'):
        rt.Localizer(engine, backend='onnxruntime')


# ------------------------------------------------------------------------------------------ frames and gating
@pytest.mark.parametrize('image, K, match', [
    (np.zeros((480, 640, 3), np.float32), None, 'dtype must be uint8'),
    (np.zeros((480, 640), np.uint8), None, r'shape must be \(H, W, 3\)'),
    (np.zeros((480, 640, 4), np.uint8), None, r'shape must be \(H, W, 3\)'),
    ([[0] * 3] * 4, None, 'numpy array'),
    (None, np.full((3, 3), np.nan), 'K must be finite'),
    (None, np.diag([0.0, 500.0, 1.0]), 'focal lengths must be > 0'),
    (None, np.eye(3)[:2], r'K must be a \(3, 3\)'),
])
def test_bad_frames_raise_value_error(torch_localizer, frames, image, K, match):
    image = frames[0][0] if image is None else image
    K = frames[0][1] if K is None else K
    with pytest.raises(ValueError, match=match):
        torch_localizer.localize(image, K)


def test_gate_reasons():
    T = np.eye(4)
    assert rt.gate(T, 0.05, 200.0, 1.0, 0.10, 10) == (True, '')
    assert rt.gate(T, 0.31, 200.0, 1.0, 0.10, 10) == (False, 'residual 0.31 m > 0.10 m')
    assert rt.gate(T, 0.05, 2.1, 1.0, 0.10, 10) == (False, 'effective points 2.1 < 10')
    assert rt.gate(T, 0.05, 200.0, 0.0, 0.10, 10) == (False, 'alignment degenerate')
    assert rt.gate(T, 0.05, 2.0, 1.0, 0.10, 0) == (False, 'alignment degenerate')
    T_nan = T.copy()
    T_nan[0, 3] = np.nan
    assert rt.gate(T_nan, 0.05, 200.0, 1.0, 0.10, 10) == (False, 'non-finite pose')
    assert rt.gate(T, np.inf, 200.0, 1.0, 0.10, 10) == (False, 'non-finite pose')
    assert np.all(rt.covariance(np.nan, 100.0, 1.0) == np.eye(6) * rt.COVARIANCE_UNKNOWN)


def test_localizer_gating_uses_its_thresholds(model_file, frames, cache_dir):
    image, K = frames[0]
    loose = rt.Localizer(model_file, backend='onnxruntime', cache_dir=cache_dir, max_residual_m=1.0)
    strict = rt.Localizer(model_file, backend='onnxruntime', cache_dir=cache_dir, max_residual_m=0.01)
    few = rt.Localizer(model_file, backend='onnxruntime', cache_dir=cache_dir, max_residual_m=1.0,
                       min_effective_points=1e6)
    a, b, c = loose.localize(image, K), strict.localize(image, K), few.localize(image, K)
    assert a.confident and a.reason == '' and 0.01 < a.residual < 1.0
    assert not b.confident and b.reason == f'residual {b.residual:.2f} m > 0.01 m'
    assert not c.confident and c.reason.startswith('effective points ')


def test_nan_network_is_never_confident(tmp_path, frames, cache_dir):
    net = GlobLocNet(NetConfig())
    with torch.no_grad():
        net.trunk[0].weight[0, 0] = float('nan')  # NaN features everywhere: scene, depth and weights
    path = tmp_path / 'nan.pt'
    save_model(net, path)
    for backend in ('torch', 'onnxruntime'):
        r = rt.Localizer(path, backend=backend, cache_dir=tmp_path, max_residual_m=1e9,
                         min_effective_points=0).localize(*frames[0])
        assert not r.confident and r.reason in ('non-finite pose', 'alignment degenerate'), r.reason
        assert np.all(np.isfinite(r.covariance))


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU: the CUDA graph path cannot run here')
def test_torch_cuda_graph_matches_cpu(model_file, frames, torch_localizer):
    fp32 = rt.Localizer(model_file, backend='torch', device='cuda', precision='fp32', max_residual_m=1.0)
    fp16 = rt.Localizer(model_file, max_residual_m=1.0)  # auto on CUDA: torch, fp16, CUDA graph
    assert (fp16.backend, fp16.device, fp16.precision) == ('torch', 'cuda', 'fp16')
    assert fp32._impl.graph is not None
    for image, K in frames:
        ref = torch_localizer.localize(image, K)
        a, b = fp32.localize(image, K), fp32.localize(image, K)  # replayed twice: same buffers, same answer
        assert np.array_equal(a.T_map_cam, b.T_map_cam)
        assert np.abs(a.T_map_cam[:3, 3] - ref.T_map_cam[:3, 3]).max() < 1e-3
        assert rotation_error_deg(a.T_map_cam[:3, :3], ref.T_map_cam[:3, :3]) < 0.05
        h = fp16.localize(image, K)
        assert np.all(np.isfinite(h.T_map_cam)) and abs(h.residual - ref.residual) < 0.01
        assert set(h.timings_ms) == {'preprocess', 'network', 'total'}
