"""align_weighted: Horn vs SVD reference, gradients, degenerate input, ONNX export."""
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import roma
import torch

from globloc_ros.align import align_weighted, pose_covariance


def _problem(B=32, N=40, noise=0.01, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    R = roma.random_rotmat(B, dtype=dtype)
    n = min(8, B)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=dtype), dim=-1)
    R[:n] = roma.rotvec_to_rotmat(axis * (math.pi - 1e-3))  # near 180 degrees
    t = torch.randn(B, 3, generator=g, dtype=dtype) * 3
    P = torch.randn(B, N, 3, generator=g, dtype=dtype) * 2
    Q = P @ R.transpose(1, 2) + t[:, None] + noise * torch.randn(B, N, 3, generator=g, dtype=dtype)
    w = torch.rand(B, N, generator=g, dtype=dtype) + 0.1
    return P, Q, w, R, t


@pytest.mark.parametrize('noise', [0.0, 0.02])
def test_horn_matches_svd_reference(noise):
    P, Q, w, R, t = _problem(noise=noise)
    horn, svd = align_weighted(P, Q, w, 'horn'), align_weighted(P, Q, w, 'svd')
    assert torch.allclose(horn.R, svd.R, atol=1e-5)
    assert torch.allclose(horn.t, svd.t, atol=1e-5)
    assert torch.allclose(horn.residual, svd.residual, atol=1e-6)
    if noise == 0.0:
        assert torch.allclose(horn.R, R, atol=1e-6) and torch.allclose(horn.t, t, atol=1e-6)
        assert horn.residual.max() < 1e-5
    assert horn.confident.all()


def test_downweighted_outliers_are_ignored():
    P, Q, w, R, t = _problem(noise=0.0)
    Q[:, :8] += 10.0 * torch.randn_like(Q[:, :8])  # gross outliers...
    w[:, :8] = 1e-9  # ...that the weights switch off
    horn, svd = align_weighted(P, Q, w, 'horn'), align_weighted(P, Q, w, 'svd')
    assert torch.allclose(horn.R, svd.R, atol=1e-5) and torch.allclose(horn.t, svd.t, atol=1e-5)
    assert (horn.R - R).abs().max() < 1e-4
    w[:, :8] = 1.0  # with the outliers weighted in, the pose must move: the test above is not vacuous
    assert (align_weighted(P, Q, w).R - R).abs().max() > 1e-2


def test_effective_point_count():
    P, Q, _, _, _ = _problem(B=2, N=10)
    w = torch.zeros(2, 10, dtype=torch.float64)
    w[0] = 1.0
    w[1, :4] = 1.0
    assert torch.allclose(align_weighted(P, Q, w).n_eff, torch.tensor([10.0, 4.0], dtype=torch.float64))


def test_gradcheck_horn_all_inputs():
    P, Q, w, _, _ = _problem(B=2, N=6, noise=0.05)
    P.requires_grad_(True)
    Q.requires_grad_(True)
    w.requires_grad_(True)

    def f(p, q, ww):
        a = align_weighted(p, q, ww, 'horn')
        return a.R, a.t, a.residual

    assert torch.autograd.gradcheck(f, (P, Q, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('case', ['zero_weights', 'nan_points', 'collinear', 'single_point', 'all_nan'])
def test_degenerate_input_is_finite_and_not_confident(case):
    P, Q, w, _, _ = _problem(B=3, N=20)
    if case == 'zero_weights':
        w[:] = 0.0
    elif case == 'nan_points':
        P[:, 3:] = float('nan')  # 3 finite points left: too few to be confident
    elif case == 'collinear':
        line = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None] * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        P[:] = line
        Q[:] = line + 1.0
    elif case == 'single_point':
        P, Q, w = P[:, :1], Q[:, :1], w[:, :1]
    elif case == 'all_nan':
        Q[:] = float('nan')
    for solver in ('horn', 'svd'):
        a = align_weighted(P, Q, w, solver)
        for x in (a.R, a.t, a.residual, a.n_eff, a.spread):
            assert torch.isfinite(x).all(), (case, solver)
        assert not a.confident.any(), (case, solver)
        assert torch.allclose(a.R @ a.R.transpose(1, 2), torch.eye(3, dtype=a.R.dtype).expand(3, 3, 3), atol=1e-6)


def test_nan_points_are_dropped_not_propagated():
    P, Q, w, R, t = _problem(noise=0.0)
    P[:, :5] = float('nan')
    a = align_weighted(P, Q, w)
    assert torch.allclose(a.R, R, atol=1e-6) and a.confident.all()


def test_covariance_grows_with_residual():
    cov = pose_covariance(torch.tensor([0.01, 0.1]), torch.tensor([1.0, 2.0]))
    assert cov.shape == (2, 6, 6)
    assert (cov[1].diagonal() > cov[0].diagonal()).all()
    assert torch.all(cov[0] == torch.diag_embed(cov[0].diagonal()))
    assert torch.allclose(cov[1].diagonal(), torch.tensor([0.01] * 3 + [0.0025] * 3))  # std 0.1 m, 0.1 / 2 rad


class _HornModule(torch.nn.Module):
    def forward(self, P, Q, w):
        a = align_weighted(P, Q, w, 'horn')
        return a.R, a.t, a.residual, a.n_eff


def test_horn_exports_to_onnx_without_decompositions(tmp_path):
    P, Q, w, _, _ = _problem(B=4, N=50, noise=0.01, dtype=torch.float32)
    path = tmp_path / 'horn.onnx'
    torch.onnx.export(_HornModule(), (P, Q, w), str(path), input_names=['P', 'Q', 'w'],
                      output_names=['R', 't', 'residual', 'n_eff'], dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {'Svd', 'Eig', 'Eigh', 'Inverse', 'Det', 'Loop', 'If', 'Scan'}, sorted(ops)
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    R, t, res, neff = sess.run(None, {'P': P.numpy(), 'Q': Q.numpy(), 'w': w.numpy()})
    ref = _HornModule()(P, Q, w)
    assert np.abs(R - ref[0].numpy()).max() < 1e-4
    assert np.abs(t - ref[1].numpy()).max() < 1e-4
