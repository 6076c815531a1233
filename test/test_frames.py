"""Frame conventions: quaternion order, intrinsics scaling, cell centres, back-projection."""
import numpy as np
import pytest
import torch

from globloc_ros import frames


def test_quaternion_order_is_xyzw():
    # 90 degrees about z: x -> y
    q = np.array([0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4)])
    R = frames.quat_xyzw_to_matrix(q)
    assert np.allclose(R @ [1, 0, 0], [0, 1, 0])
    assert np.allclose(frames.matrix_to_quat_xyzw(R), q)


@pytest.mark.parametrize('q', [[0, 0, 0, 2.0], [np.nan, 0, 0, 1], [0, 0, 1]])
def test_bad_quaternion_is_rejected(q):
    with pytest.raises(ValueError, match='quaternion'):
        frames.quat_xyzw_to_matrix(q)


def test_scale_intrinsics_pixel_centre_rule_matches_cell_centres():
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    # a stride-8 map is the image downscaled by 1/8: its cell (i, j) must project like pixel (j, i)
    K8 = frames.scale_intrinsics(K, 1 / 8, 1 / 8)
    uv = frames.cell_centres(60, 80, 8).numpy()
    uv8 = np.stack([(uv[:, 0] + 0.5) / 8 - 0.5, (uv[:, 1] + 0.5) / 8 - 0.5], -1)
    assert np.allclose(uv8[:3], [[0, 0], [1, 0], [2, 0]])
    assert np.allclose(K8[:2, 2], [39.5, 29.5])  # image centre stays the centre
    Kt = frames.scale_intrinsics_torch(torch.tensor(K)[None], 0.5, 0.25)[0].numpy()
    assert np.allclose(Kt, frames.scale_intrinsics(K, 0.5, 0.25))


def test_backproject_then_project_round_trip():
    K = np.array([[400.0, 0, 160.0], [0, 410.0, 120.0], [0, 0, 1]])
    uv = frames.cell_centres(30, 40, 8)
    depth = torch.rand(1, uv.shape[0], dtype=torch.float64) * 5 + 0.5
    X = frames.backproject(depth, uv.double(), torch.tensor(K)[None])[0].numpy()
    uv2, z = frames.project(X, K)
    assert np.allclose(uv2, uv.numpy()) and np.allclose(z, depth[0].numpy())


def test_pose_errors_and_inverse():
    T = frames.pose_from_xyz_quat([1, 2, 3], [0, np.sin(0.3), 0, np.cos(0.3)])
    assert np.allclose(frames.invert_pose(T) @ T, np.eye(4))
    dt, dr = frames.pose_errors(T, frames.relative_pose(np.eye(4), T))
    assert dt == pytest.approx(0.0) and dr == pytest.approx(0.0, abs=1e-5)
    T2 = T.copy()
    T2[:3, 3] += [0.03, 0.04, 0]
    assert frames.pose_errors(T2, T)[0] == pytest.approx(0.05)
    assert frames.pose_errors(T, np.eye(4))[1] == pytest.approx(np.degrees(0.6))
