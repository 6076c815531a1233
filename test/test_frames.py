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


def test_measured_depth_at_cells_averages_sensor_noise_and_drops_edges_and_holes():
    # A slanted plane 2-4 m away at 320x240, sampled for a 128x96 input (stride 8: 16x12 cells).
    h0, w0, h, w, stride = 240, 320, 12, 16, 8
    sx, sy = 128 / w0, 96 / h0
    plane = np.broadcast_to(2.0 + np.linspace(0, 2, w0, dtype=np.float32), (h0, w0)).copy()
    truth = frames.depth_at_cells(plane, sx, sy, h, w, stride)
    assert np.abs(frames.measured_depth_at_cells(plane, sx, sy, h, w, stride) - truth).max() < 1e-3
    # Kinect-like noise (1 % of z + 2.85 mm z^2): four bilinear pixels lose cells to the edge test and are off by
    # twice as much where they keep them; the window median keeps every cell.
    rng = np.random.default_rng(0)
    noisy = plane + rng.standard_normal(plane.shape).astype(np.float32) * (0.01 * plane + 0.00285 * plane ** 2)
    robust = frames.measured_depth_at_cells(noisy, sx, sy, h, w, stride)
    bilinear = frames.depth_at_cells(noisy, sx, sy, h, w, stride)
    assert np.isfinite(robust).all() and np.isnan(bilinear).mean() > 0.1
    assert np.median(np.abs(robust - truth)) * 2 < np.nanmedian(np.abs(bilinear - truth))
    # A depth edge through a cell's window, and a cell whose window is mostly holes: not measured.
    step = plane.copy()
    step[:, 30:] += 1.0  # cell column 1 is centred at pixel 29.5
    holes = plane.copy()
    holes[:20, :20] = np.nan  # the whole window of cell (0, 0)
    assert np.isnan(frames.measured_depth_at_cells(step, sx, sy, h, w, stride)[:, 1]).all()
    assert np.isnan(frames.measured_depth_at_cells(holes, sx, sy, h, w, stride)[0, 0])
    assert np.isfinite(frames.measured_depth_at_cells(holes, sx, sy, h, w, stride)[1:, 1:]).all()
