"""globloc export: ONNX checked and compared with PyTorch on real frames, op allow-list, TorchScript, TensorRT."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from globloc import export as ex
from globloc.cli import main as cli_main
from globloc_ros import runtime as rt
from globloc_ros.frames import rotation_error_deg
from globloc_ros.modelfile import load_model, save_model
from globloc_ros.net import GlobLocNet, NetConfig, PoseGraph


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    """An untrained, seeded GlobLocNet at the default 320x240 input size, its depth for a focal length of 300 px
    (the real frames' own differs, so the graph's fx / depth_focal scaling is exercised)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('model') / 'seeded.pt'
    config = NetConfig(scene_centre=(0.5, 1.0, 1.5), scene_scale=2.0, depth_focal=300.0)
    save_model(GlobLocNet(config), path, meta={'seed': 0})
    return path


@pytest.fixture(scope='module')
def bag_frames(real_bags):
    """Four real frames of sun3d_frag1 resized to 320x240 (K scaled) by the bag reader."""
    return ex.bag_check_frames(real_bags / 'sun3d_frag1', (320, 240), n=4)


@pytest.fixture(scope='module')
def onnx_file(model_file, bag_frames, tmp_path_factory):
    out = tmp_path_factory.mktemp('onnx') / 'seeded.onnx'
    return out, ex.export_onnx(model_file, out, check_frames=bag_frames)


def test_onnx_passes_checker_allow_list_and_matches_torch_on_real_frames(onnx_file, model_file, bag_frames):
    path, result = onnx_file
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = ex.check_ops(model)
    assert set(ops) <= ex.TENSORRT_OPS and ops['Conv'] == 10 and ops['MatMul'] > 20  # Horn's squarings
    assert not set(ops) & {'Svd', 'Eig', 'Inverse', 'Det', 'If', 'Loop', 'Scan', 'NonZero'}
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {'image': [1, 3, 240, 320], 'K': [1, 3, 3], 'depth': [1, 1, 30, 40]}
    assert [o.name for o in model.graph.output] == list(rt.OUTPUT_NAMES)
    # the figures export_onnx reported, then an independent re-check on the same real frames
    assert result.check_frames == 4 and result.max_dt_m < 1e-4 and result.max_drot_deg < 1e-3
    net, _ = load_model(model_file)
    dt, dr = ex.compare_onnx_with_torch(path, net, bag_frames)
    assert dt < 1e-4 and dr < 1e-3, (dt, dr)
    # the frames are real and the outputs not trivial: poses differ between frames
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    no_depth = np.zeros((1, 1, 30, 40), np.float32)
    Ts = [sess.run(['T_map_cam'], {**dict(zip(('image', 'K'), (t.numpy() for t in rt.preprocess(i, K, (320, 240))))),
                                   'depth': no_depth})[0]
          for i, K in bag_frames]
    assert np.abs(Ts[0] - Ts[-1]).max() > 1e-3


def test_onnx_metadata(onnx_file, model_file):
    path, _ = onnx_file
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert rt.check_graph_metadata(meta, str(path)) == (320, 240)
    assert meta['globloc.model_sha256'] == rt.file_sha256(model_file)
    assert meta['globloc.torch_version'] == torch.__version__
    assert json.loads(meta['globloc.scene']) == {'centre': [0.5, 1.0, 1.5], 'scale': 2.0}
    assert json.loads(meta['globloc.normalisation'])['std'] == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    assert meta['globloc.dynamic_batch'] == 'false'


def test_mobilenet_v2_backbone_exports_and_matches_torch(real_bags, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / 'mobilenet.pt'
    config = NetConfig(input_size=(128, 96), backbone='mobilenet_v2', norm='group', scene_scale=2.0, depth_focal=120.0)
    save_model(GlobLocNet(config), path)
    frames = ex.bag_check_frames(real_bags / 'sun3d_frag1', (128, 96), n=2)
    result = ex.export_onnx(path, tmp_path / 'mobilenet.onnx', check_frames=frames)
    assert result.check_frames == 2 and result.max_dt_m < 1e-4 and result.max_drot_deg < 1e-3
    # convs: stem, 13 inverted-residual blocks (the first without expansion), fuse, trunk, 3 heads
    assert result.ops['Resize'] == 1 and result.ops['Conv'] == 1 + 2 + 12 * 3 + 1 + 1 + 3


def test_dynamic_batch_runs_a_batch_like_single_frames(model_file, bag_frames, tmp_path):
    out = tmp_path / 'dyn.onnx'
    ex.export_onnx(model_file, out, dynamic_batch=True, check_frames=bag_frames[:1])
    sess = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    xs, Ks = zip(*(rt.preprocess(i, K, (320, 240)) for i, K in bag_frames))
    # measured 0..3 m on three quarters of the cells, 0 (not measured) elsewhere
    d = (torch.rand(4, 1, 30, 40, generator=torch.Generator().manual_seed(0)) * 4 - 1).clamp(min=0)
    T, residual, n_eff, spread = sess.run(None, {'image': torch.cat(xs).numpy(), 'K': torch.cat(Ks).numpy(),
                                                 'depth': d.numpy()})
    assert T.shape == (4, 4, 4) and residual.shape == n_eff.shape == spread.shape == (4,)
    graph = PoseGraph(load_model(model_file)[0])
    with torch.no_grad():
        ref = graph(torch.cat(xs), torch.cat(Ks), d)[0].numpy()
    assert np.abs(T[:, :3, 3] - ref[:, :3, 3]).max() < 1e-4
    assert rotation_error_deg(T[:, :3, :3], ref[:, :3, :3]).max() < 1e-3


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize('fn, match', [
    (torch.linalg.det, 'Det'),
    (lambda x: torch.nonzero(x > 0.5).float(), 'NonZero'),
    (lambda x: torch.linalg.svd(x)[0], 'linalg_svd'),
    (torch.linalg.inv, 'linalg_inv'),
])
def test_forbidden_ops_are_refused(fn, match):
    with pytest.raises(ex.UnsupportedOpError, match=match):
        ex.to_onnx(_Fn(fn), (torch.rand(2, 3, 3),), ('x',), ('y',))


def test_control_flow_and_foreign_domains_are_refused():
    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])
    branch = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'b', [], [y])
    cond = helper.make_node('Constant', [], ['c'], value=helper.make_tensor('c', TensorProto.BOOL, [], [True]))
    node = helper.make_node('If', ['c'], ['y'], then_branch=branch, else_branch=branch, name='the_if')
    model = helper.make_model(helper.make_graph([cond, node], 'g', [x], [y]))
    with pytest.raises(ex.UnsupportedOpError, match=r'If x1 \(e.g. node the_if\)'):
        ex.check_ops(model)
    inv = helper.make_node('Inverse', ['x'], ['y'], domain='com.microsoft')
    with pytest.raises(ex.UnsupportedOpError, match='com.microsoft:Inverse'):
        ex.check_ops(helper.make_model(helper.make_graph([inv], 'g', [x], [y])))
    ok = helper.make_model(helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', [x], [y]))
    assert ex.check_ops(ok) == {'Relu': 1}


def test_torchscript_loads_with_metadata_and_matches(model_file, bag_frames, tmp_path):
    out = tmp_path / 'seeded.ts'
    res = ex.export_torchscript(model_file, out, check_frames=bag_frames)
    assert res.max_dt_m == 0.0 or res.max_dt_m < 1e-6
    module, meta = ex.load_torchscript(out)
    assert meta['globloc.model_sha256'] == rt.file_sha256(model_file)
    xs, Ks = zip(*(rt.preprocess(i, K, (320, 240)) for i, K in bag_frames[:2]))
    x, K = torch.cat(xs), torch.cat(Ks)  # a batch of 2 through a module traced with batch 1
    d = torch.zeros(2, 1, 30, 40)
    d[1, :, :, :20] = 2.5  # the second frame measured on the left half
    graph = PoseGraph(load_model(model_file)[0])
    with torch.no_grad():
        got, ref = module(x, K, d), graph(x, K, d)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-6)
    bad = tmp_path / 'bad.ts'
    bad.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(rt.LocalizerError, match='bad.ts'):
        ex.load_torchscript(bad)


def test_cli_prints_ops_and_refuses_bad_options(model_file, tmp_path, capsys):
    out = tmp_path / 'cli.onnx'
    with pytest.raises(SystemExit) as e:
        cli_main(['export', '--model', str(model_file), '--format', 'onnx', '--out', str(out)])
    assert e.value.code == 0 and out.is_file()
    text = capsys.readouterr().out
    assert 'ONNX ops' in text and 'MatMul x' in text and 'onnxruntime vs PyTorch' in text
    with pytest.raises(SystemExit) as e:
        cli_main(['export', '--model', str(model_file), '--format', 'onnx', '--precision', 'fp16',
                  '--out', str(tmp_path / 'x.onnx')])
    assert e.value.code == 2 and 'fp16 applies to --format tensorrt' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(['export', '--model', str(tmp_path / 'missing.pt'), '--format', 'onnx', '--out', str(out)])
    assert e.value.code == 2 and 'not found' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the exported graph given to eval: it says which file it takes
        cli_main(['eval', '--model', str(out), '--bags', str(tmp_path)])
    assert e.value.code == 2 and 'eval takes the .pt model file' in capsys.readouterr().err


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_tensorrt(), reason='TensorRT is installed: the "not installed" message cannot be shown')
def test_tensorrt_absent_gives_a_clear_error(model_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(['export', '--model', str(model_file), '--format', 'tensorrt', '--out', str(tmp_path / 'm.engine')])
    assert e.value.code == 2 and 'TensorRT is not installed' in capsys.readouterr().err
    assert not (tmp_path / 'm.engine').exists()


@pytest.mark.skipif(not (_has_tensorrt() and torch.cuda.is_available()),
                    reason='TensorRT is not installed' if not _has_tensorrt() else 'no CUDA GPU for TensorRT')
@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_tensorrt_engine_builds_and_matches_onnxruntime(onnx_file, model_file, bag_frames, tmp_path, precision):
    path, _ = onnx_file
    engine = tmp_path / f'seeded_{precision}.engine'
    meta = ex.build_engine(path, engine, precision, timing_cache=tmp_path / 'timing.cache')
    assert engine.is_file() and (tmp_path / 'timing.cache').is_file()
    assert meta['gpu'] == rt.gpu_identity() and meta['engine_sha256'] == rt.file_sha256(engine)
    trt_lz = rt.Localizer(engine)
    ort_lz = rt.Localizer(path, backend='onnxruntime', device='cpu')
    assert trt_lz.backend == 'tensorrt' and trt_lz.precision == precision
    # fp16 convs: an untrained net's rotation is ill-conditioned, so only a plausibility bound there
    tol_t, tol_r = (1e-4, 1e-3) if precision == 'fp32' else (0.05, 10.0)
    for image, K in bag_frames:
        a, b = trt_lz.localize(image, K), ort_lz.localize(image, K)
        assert np.abs(a.T_map_cam[:3, 3] - b.T_map_cam[:3, 3]).max() < tol_t
        assert rotation_error_deg(a.T_map_cam[:3, :3], b.T_map_cam[:3, :3]) < tol_r
