"""The place map and the refinements against it (globloc_ros.placemap, `globloc map`, Localizer place_map)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from globloc import bags as bg
from globloc import bench_place, mapper
from globloc_ros import frames as fr
from globloc_ros import placemap as pm

REPO = Path(__file__).resolve().parents[1]

K = np.array([[100.0, 0, 79.5], [0, 100.0, 59.5], [0, 0, 1]])  # 160x120
PRIOR = np.diag([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])


def _turn(deg_xyz) -> np.ndarray:
    return cv2.Rodrigues(np.radians(np.asarray(deg_xyz, float)))[0]


def _perturbed(T: np.ndarray, t_m, r_deg) -> np.ndarray:
    """T moved by t_m (map axes) and turned by r_deg (map axes, about the camera centre)."""
    out = T.copy()
    out[:3, :3] = _turn(r_deg) @ T[:3, :3]
    out[:3, 3] += t_m
    return out


def _errors(T_est: np.ndarray, T_gt: np.ndarray) -> tuple[float, float]:
    t, r = fr.pose_errors(T_est[None], T_gt[None])
    return float(t[0]), float(r[0])


@pytest.fixture(scope='module')
def scene_map(tiny_scene):
    """(map of tiny_scene's seq_00 + seq_01, held-out seq_02 frames)."""
    views = [pm.View(f.image, f.K, f.T_map_cam, f.depth) for i in (0, 1)
             for f in bg.read_sequence(tiny_scene / f'seq_0{i}', seq=i, progress=False).frames]
    held_out = bg.read_sequence(tiny_scene / 'seq_02', seq=2, progress=False).frames
    return pm.build_map(views), held_out


def _wall(distance: float = 2.0, size=(120, 160)) -> np.ndarray:
    """Depth image of a fronto-parallel wall."""
    return np.full(size, distance, np.float32)


def _view(depth: np.ndarray | None, T: np.ndarray = np.eye(4), seed: int = 0) -> pm.View:
    """A frame of a wall with a random texture (features to detect)."""
    texture = np.random.default_rng(seed).integers(0, 256, (30, 40), np.uint8)
    image = np.repeat(np.kron(texture, np.ones((4, 4), np.uint8))[..., None], 3, 2)
    return pm.View(image, K, T, depth)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{**dict(voxel=0.02, stride=2, features=pm.MAP_FEATURES, holdout=None, force=False,
                                        topic=None), **kw})


# ------------------------------------------------------------------------------------------------ building
def test_build_map_averages_surfaces_per_voxel_with_normals_facing_the_cameras():
    # The same wall (z = 2 m in the map) seen by two cameras 0.3 m apart.
    T_b = fr.pose_matrix(np.eye(3), np.array([0.3, 0.0, 0.0]))
    cloud = pm.build_map([_view(_wall()), _view(_wall(), T_b), _view(None)], voxel=0.05)
    assert np.allclose(cloud.points[:, 2], 2.0, atol=1e-5)
    assert np.allclose(cloud.normals, [0, 0, -1], atol=1e-5)  # towards the cameras (at z = 0)
    # The walls span x in [-1.59, 1.91] m, y in [-1.19, 1.19] m: about (3.5 / 0.05) x (2.4 / 0.05) voxels.
    assert 0.85 < len(cloud.points) / (3.5 / 0.05 * 2.4 / 0.05) < 1.15
    lo, hi = cloud.points.min(0), cloud.points.max(0)
    assert lo[0] == pytest.approx(-1.59 + 0.04, abs=0.05) and hi[0] == pytest.approx(1.91 - 0.04, abs=0.05)
    assert cloud.meta['observations'] > len(cloud.points)
    with pytest.raises(ValueError, match='no recorded depth'):
        pm.build_map([_view(None)])


def test_depth_edges_make_no_map_points():
    depth = _wall()
    depth[:, 80:] = 4.0  # a step of 2 m: no surface between the two walls
    cloud = pm.build_map([_view(depth)], voxel=0.02, n_features=0)
    assert len(cloud.feature_points) == 0
    assert set(np.round(cloud.points[:, 2], 3)) == {2.0, 4.0}


def test_save_and_load_round_trip_and_clear_errors(tmp_path):
    cloud = pm.build_map([_view(_wall())], voxel=0.05, meta={'bags': ['x']})
    path = tmp_path / 'm.map.npz'
    pm.save_map(cloud, path)
    back = pm.load_map(path)
    assert np.array_equal(back.points, cloud.points) and back.voxel == 0.05 and back.meta['bags'] == ['x']
    assert len(back.feature_points) > 50 and np.array_equal(back.descriptors, cloud.descriptors)
    assert np.abs(back.normals - cloud.normals).max() < 1e-3  # stored as float16
    assert cloud.spread_features and back.spread_features  # frames with depth: features spread over the image
    assert [p.name for p in tmp_path.iterdir()] == ['m.map.npz']  # no temporary file left

    with pytest.raises(pm.MapError, match='map file not found: .*missing.npz'):
        pm.load_map(tmp_path / 'missing.npz')
    (tmp_path / 'junk.npz').write_bytes(b'not a zip' * 10)
    with pytest.raises(pm.MapError, match=r'junk.npz: not a globloc map file \(not an .npz archive'):
        pm.load_map(tmp_path / 'junk.npz')
    data = path.read_bytes()
    (tmp_path / 'cut.npz').write_bytes(data[:len(data) // 2])  # truncated
    with pytest.raises(pm.MapError, match=r'cut.npz: not a readable globloc map file \(BadZipFile'):
        pm.load_map(tmp_path / 'cut.npz')
    mid = len(data) // 2  # corrupt bytes inside a compressed array
    (tmp_path / 'bad.npz').write_bytes(data[:mid] + bytes(64) + data[mid + 64:])
    with pytest.raises(pm.MapError, match='bad.npz: not a readable globloc map file'):
        pm.load_map(tmp_path / 'bad.npz')
    header = {'format': pm.MAP_FORMAT, 'version': pm.MAP_VERSION + 1, 'voxel': 0.05}
    arrays = dict(points=cloud.points, normals=cloud.normals, feature_points=cloud.feature_points,
                  descriptors=cloud.descriptors, **{k: getattr(cloud, k) for k in pm.KEYFRAME_ARRAYS})
    np.savez(tmp_path / 'new.npz', **arrays, header=json.dumps(header))
    with pytest.raises(pm.MapError, match='new.npz: map version 4 is not 3; rebuild it'):
        pm.load_map(tmp_path / 'new.npz')
    # Each keyframe's features: its own, all of them in the map.
    start = back.keyframe_features_start
    assert len(start) == len(back.keyframe_bow) + 1 and start[-1] == len(back.keyframe_features) > 0
    assert np.array_equal(back.keyframe_features, cloud.keyframe_features)
    assert np.array_equal(back.seen_by(np.arange(len(start) - 1)), np.unique(cloud.keyframe_features))
    header['version'] = 2  # a map from before keyframe visibility: loads without it
    np.savez(tmp_path / 'v2.npz', **arrays, header=json.dumps(header))
    v2 = pm.load_map(tmp_path / 'v2.npz')
    assert len(v2.keyframe_bow) == len(back.keyframe_bow) and len(v2.keyframe_features_start) == 0
    assert not v2.spread_features  # a map from before spread features: queries detect the strongest, as it did
    header['version'] = pm.MAP_VERSION
    np.savez(tmp_path / 'vis.npz', **arrays, keyframe_features=back.keyframe_features + len(back.feature_points),
             keyframe_features_start=start, header=json.dumps(header))
    with pytest.raises(pm.MapError, match=r'vis.npz: keyframe_features \(\d+\) and .* do not index the \d+ features'):
        pm.load_map(tmp_path / 'vis.npz')
    header['version'] = 1  # a map from before keyframes: loads, and recovery says why it cannot run
    np.savez(tmp_path / 'v1.npz', **arrays, header=json.dumps(header))
    v1 = pm.load_map(tmp_path / 'v1.npz')
    assert len(v1.keyframe_bow) == 0 and np.array_equal(v1.descriptors, cloud.descriptors)
    rec = pm.recover(v1, np.zeros((120, 160, 3), np.uint8), np.eye(3), None)
    assert not rec.accepted and 'rebuild it with `globloc map`' in rec.reason
    assert len(back.keyframe_bow) == back.meta['keyframes'] >= 1 and np.array_equal(back.vocabulary, cloud.vocabulary)
    header['version'] = pm.MAP_VERSION
    arrays.update({k: getattr(cloud, k) for k in pm.VISIBILITY_ARRAYS})
    np.savez(tmp_path / 'nan.npz', **{**arrays, 'points': cloud.points * np.nan}, header=json.dumps(header))
    with pytest.raises(pm.MapError, match='nan.npz: points, normals or feature points are not finite'):
        pm.load_map(tmp_path / 'nan.npz')
    np.savez(tmp_path / 'des.npz', **{**arrays, 'descriptors': cloud.descriptors[:, :16]}, header=json.dumps(header))
    with pytest.raises(pm.MapError, match=r'des.npz: .*descriptors \(\d+, 16\) uint8: expected'):
        pm.load_map(tmp_path / 'des.npz')


# ------------------------------------------------------------------------------------------------ refinement
def test_refinement_recovers_perturbed_poses_of_held_out_frames(scene_map):
    cloud, frames = scene_map
    rng = np.random.default_rng(0)
    errors = []
    for f in frames[::3]:
        T0 = _perturbed(f.T_map_cam, rng.normal(0, 0.04, 3), rng.normal(0, 1.5, 3))
        r = pm.refine_icp(cloud, T0, f.depth, f.K, PRIOR)
        assert r.accepted, r.reason
        assert r.method == 'icp' and r.inlier_fraction > 0.8 and r.rms < 0.02  # some surfaces were never mapped
        assert 500 < r.points <= pm.MAX_QUERY_POINTS
        errors.append(_errors(r.T_map_cam, f.T_map_cam))
        assert errors[-1][0] < _errors(T0, f.T_map_cam)[0]
    t, rot = np.array(errors).T
    assert np.median(t) < 0.005 and np.median(rot) < 0.2, (t, rot)


def test_unconstrained_directions_keep_the_pose_given():
    # A wall constrains the distance to it and two rotations; sliding along it and turning about its normal are free.
    cloud = pm.build_map([_view(_wall())], voxel=0.02)
    T0 = _perturbed(np.eye(4), [0.05, -0.04, 0.03], [0, 0, 2.0])
    r = pm.refine_icp(cloud, T0, _wall(), K, PRIOR)
    assert r.accepted, r.reason
    assert r.constrained == 3
    assert r.T_map_cam[2, 3] == pytest.approx(0.0, abs=2e-3)  # the distance to the wall is corrected
    assert np.allclose(r.T_map_cam[:2, 3], T0[:2, 3], atol=1e-6)  # the slide is not observable: kept
    assert fr.rotation_error_deg(r.T_map_cam[:3, :3], T0[:3, :3]) < 0.01
    # Covariance: the prior's where nothing was measured (x, y, yaw), the data's where it was, which is the map's
    # floor here (exact depth: 1 % of the 2 m to the wall).
    assert np.allclose(np.diag(r.covariance)[[0, 1, 5]], np.diag(PRIOR)[[0, 1, 5]])
    assert r.covariance[2, 2] == pytest.approx((pm.FLOOR_RELATIVE['icp'] * 2.0) ** 2, rel=0.01)
    assert np.allclose(r.covariance, r.covariance.T)


def test_refinement_is_rejected_and_the_pose_kept_when_it_cannot_be_trusted(scene_map):
    cloud, frames = scene_map
    f = frames[0]
    cases = [  # (pose given, depth, why the refinement is refused)
        (_perturbed(f.T_map_cam, [1.5, 0, 0], [0, 0, 0]), f.depth, r'within 0\.\d+ m of the map|on the map|correction'),
        (f.T_map_cam, np.full_like(f.depth, np.nan), r'^0 depth points < 50$'),
        (f.T_map_cam, f.depth + 0.5, r'within 0\.\d+ m of the map|on the map|correction'),
    ]
    for T0, depth, reason in cases:
        r = pm.refine_icp(cloud, T0, depth, f.K, PRIOR)
        assert not r.accepted and re.search(reason, r.reason), r.reason
        assert np.array_equal(r.T_map_cam, T0) and np.array_equal(r.covariance, PRIOR)
    # A correction larger than max_correction is refused even when the surfaces agree.
    T0 = _perturbed(f.T_map_cam, [0.06, 0, 0], [0, 0, 0])
    r = pm.refine_icp(cloud, T0, f.depth, f.K, PRIOR, max_correction=(0.02, 10.0))
    assert not r.accepted and 'exceeds 0.02 m' in r.reason


# ------------------------------------------------------------------------------------------------ features
def test_features_lie_on_the_recorded_surfaces_and_repeats_are_thinned():
    one = pm.build_map([_view(_wall())], voxel=0.05)
    assert len(one.feature_points) > 50 and one.descriptors.shape == (len(one.feature_points), 32)
    assert np.allclose(one.feature_points[:, 2], 2.0, atol=1e-5)
    # The same view five times: each point of the place keeps at most FEATURES_PER_VOXEL descriptors.
    five = pm.build_map([_view(_wall())] * 5, voxel=0.05)
    assert len(one.feature_points) <= len(five.feature_points) <= pm.FEATURES_PER_VOXEL * len(one.feature_points)
    _, per_voxel = np.unique(pm._voxel_keys(five.feature_points, pm.FEATURE_VOXEL_M), return_counts=True)
    assert per_voxel.max() <= pm.FEATURES_PER_VOXEL and five.meta['features'] == len(five.feature_points)


def test_hamming_distances_are_opencvs():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, (40, 32), np.uint8), rng.integers(0, 256, (30, 32), np.uint8)
    i, j = rng.integers(0, 40, 500), rng.integers(0, 30, 500)
    expected = [cv2.norm(a[x], b[y], cv2.NORM_HAMMING) for x, y in zip(i, j)]
    assert pm.hamming(a, i, b, j).tolist() == expected


def test_feature_refinement_of_held_out_frames(scene_map):
    """Image only (160x120, so a pixel is 1-2 cm on the walls): poses moved by about 10 cm / 3.5 deg come back to a
    few cm, and a pose the matches do not pin down is refused rather than published."""
    place, frames = scene_map
    rng = np.random.default_rng(0)
    before, after = [], []
    for f in frames:
        T0 = _perturbed(f.T_map_cam, rng.normal(0, 0.06, 3), rng.normal(0, 2, 3))
        r = pm.refine_features(place, T0, f.image, f.K, PRIOR)
        assert r.method == 'features'
        if not r.accepted:
            assert re.search('image features|feature matches|PnP inliers|not pinned', r.reason), r.reason
            assert np.array_equal(r.T_map_cam, T0) and np.array_equal(r.covariance, PRIOR)
            continue
        before.append(_errors(T0, f.T_map_cam))
        after.append(_errors(r.T_map_cam, f.T_map_cam))
        assert after[-1][0] < 0.06 and r.points >= pm.MIN_PNP_INLIERS and r.rms < pm.PNP_ERROR_PX
        assert np.all(np.linalg.eigvalsh(r.covariance) > 0)
    assert len(after) >= len(frames) / 3
    before, after = np.median(before, 0), np.median(after, 0)
    assert after[0] < 0.03 and np.all(after < 0.5 * before), (before, after)


def test_a_larger_place_is_searched_near_the_camera_only(scene_map):
    """Nine copies of the room side by side: guided matching looks at the features within what the keyframes
    ever saw of the camera (not at all of them), and refines each frame exactly as in the room alone."""
    place, frames = scene_map
    big = bench_place.side_by_side(place, 3)
    assert place.feature_range_m == np.inf and 0 < big.feature_range_m < np.ptp(big.feature_points, 0).max() / 2
    near = big.features_near(frames[0].T_map_cam[:3, 3])
    assert set(range(len(place.feature_points))) <= set(near) and len(near) < len(big.feature_points)
    assert np.array_equal(big.seen_by(np.array([0])), place.seen_by(np.array([0])))
    rng = np.random.default_rng(0)
    for f in frames[::4]:
        T0 = _perturbed(f.T_map_cam, rng.normal(0, 0.03, 3), rng.normal(0, 1, 3))
        one, nine = (pm.refine_features(p, T0, f.image, f.K, PRIOR) for p in (place, big))
        assert one.accepted == nine.accepted and np.allclose(one.T_map_cam, nine.T_map_cam, atol=1e-6)


def test_bench_place_as_a_user_types_it(scene_map, tiny_scene, tmp_path):
    """`globloc bench-place`: the map and 2 x 2 copies of it, written, loaded and timed; a table, JSON and plot."""
    import subprocess
    import sys

    pm.save_map(scene_map[0], tmp_path / 'room.map.npz')
    run = subprocess.run([sys.executable, '-m', 'globloc', 'bench-place', '--map', str(tmp_path / 'room.map.npz'),
                          '--bag', str(tiny_scene / 'seq_02'), '--copies', '1', '2', '--every', '8',
                          '--json', str(tmp_path / 'p.json'), '--plot', str(tmp_path / 'p.png')],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    one, four = json.loads((tmp_path / 'p.json').read_text())['rows']
    assert (four['copies'], four['features'], four['keyframes']) == (4, 4 * one['features'], 4 * one['keyframes'])
    assert four['surface_points'] == 4 * one['surface_points'] and four['file_mb'] > one['file_mb']
    assert all(r[f'{s}_ms_p50'] > 0 for r in (one, four) for s in bench_place.STAGES)
    assert '| 4 |' in run.stdout and (tmp_path / 'p.png').stat().st_size > 10_000
    pm.save_map(dataclasses.replace(scene_map[0], keyframe_features_start=np.zeros(0, np.int64),
                                    keyframe_features=np.zeros(0, np.int32)), tmp_path / 'v2.map.npz')
    run = subprocess.run([sys.executable, '-m', 'globloc', 'bench-place', '--map', str(tmp_path / 'v2.map.npz'),
                          '--bag', str(tiny_scene / 'seq_02')], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and 'rebuild it with `globloc map`' in run.stderr.splitlines()[-1], run.stderr


def test_feature_refinement_refuses_what_it_cannot_match(scene_map):
    place, frames = scene_map
    f = frames[0]
    gray = np.full_like(f.image, 128)
    r = pm.refine_features(place, f.T_map_cam, gray, f.K, PRIOR)
    assert not r.accepted and r.reason == f'0 image features < {pm.MIN_PNP_INLIERS}'
    far = _perturbed(f.T_map_cam, [0, 0, 0], [0, 40, 0])  # looking elsewhere
    r = pm.refine_features(place, far, f.image, f.K, PRIOR)
    assert not r.accepted and re.search('feature matches|PnP inliers', r.reason), r.reason
    assert np.array_equal(r.T_map_cam, far)


# ------------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope='module')
def sun3d_map(real_bags, tmp_path_factory):
    """(`globloc map` of SUN3D frag1 leaving out every 5th frame, those frames, the bag)."""
    bag = real_bags / 'sun3d_frag1'
    out = tmp_path_factory.mktemp('sun3d') / 'frag1.map.npz'
    mapper.run(_args(bags=[bag], out=out, holdout='every:5'))
    frames = [f for f in bg.read_sequence(bag, progress=False).frames if f.index % 5 == 0]
    return pm.load_map(out), frames, bag, out


def test_icp_refinement_on_real_rgbd_frames(sun3d_map):
    """The held-out frames from their ground-truth pose moved by about 5 cm / 2 deg. SUN3D's own poses are
    reconstructions (neighbouring frames disagree by about 1 cm / 0.6 deg), so the refined poses are checked
    against them at that level."""
    place, frames, bag, out = sun3d_map
    assert place.meta['frames'] == 40 and place.meta['holdout'] == 'every:5'
    assert len(place.points) > 10_000 and len(place.feature_points) > 1000
    rng = np.random.default_rng(1)
    before, after, starts, ends = [], [], [], []
    for f in frames:
        a, b = (_perturbed(f.T_map_cam, rng.normal(0, 0.03, 3), rng.normal(0, 1.2, 3)) for _ in range(2))
        ra, rb = (pm.refine_icp(place, T0, f.depth, f.K, PRIOR) for T0 in (a, b))
        assert ra.accepted and rb.accepted, (ra.reason, rb.reason)
        starts.append(_errors(a, b))
        ends.append(_errors(ra.T_map_cam, rb.T_map_cam))
        before.append(_errors(a, f.T_map_cam))
        after.append(_errors(ra.T_map_cam, f.T_map_cam))
    # Two starts end nearer each other, whatever the ground truth's own error. Real depth noise and a map built
    # from imperfect poses leave a shallow optimum: starts 3.6 cm / 2.3 deg apart end 2.4 cm / 0.7 deg apart.
    starts, ends = np.median(starts, 0), np.median(ends, 0)
    assert ends[0] < 0.8 * starts[0] and ends[1] < 0.5 * starts[1], (starts, ends)
    before, after = np.median(before, 0), np.median(after, 0)
    assert after[0] < 0.025 and after[1] < 1.2 and np.all(after < 0.8 * before), (before, after)
    with pytest.raises(ValueError, match='already exists; pass --force'):
        mapper.run(_args(bags=[bag], out=out))


def test_feature_refinement_on_real_images(sun3d_map):
    """A camera without depth against the same map: real 640x480 jpeg images, from about 6.5 cm / 2.8 deg off."""
    place, frames, _, _ = sun3d_map
    rng = np.random.default_rng(0)
    before, after = [], []
    for f in frames:
        T0 = _perturbed(f.T_map_cam, rng.normal(0, 0.05, 3), rng.normal(0, 2, 3))
        r = pm.refine_features(place, T0, f.image, f.K, PRIOR)
        before.append(_errors(T0, f.T_map_cam))
        after.append(_errors(r.T_map_cam, f.T_map_cam))
        assert r.accepted or after[-1] == before[-1]
    before, after = np.median(before, 0), np.median(after, 0)
    assert after[0] < 0.04 and after[0] < 0.7 * before[0] and after[1] < 0.3 * before[1], (before, after)


def test_triangulated_features_lie_on_the_surfaces(tiny_scene):
    """Frames without depth: features triangulated between frames with the known poses. The recorded depth, hidden
    from the builder, checks where they are."""
    frames = bg.read_sequence(tiny_scene / 'seq_00', progress=False).frames
    place = pm.build_map([pm.View(f.image, f.K, f.T_map_cam, None) for f in frames])
    assert len(place.points) == 0 and len(place.feature_points) > 150
    rel = []
    for f in frames:
        uv, z = pm._project(place.feature_points.astype(np.float64), f.T_map_cam[:3, :3], f.T_map_cam[:3, 3], f.K)
        u, v = np.round(uv).astype(int).T
        inside = (z > 0) & (u >= 0) & (u < f.depth.shape[1]) & (v >= 0) & (v < f.depth.shape[0])
        d = f.depth[v[inside], u[inside]]
        rel.append((z[inside] - d)[np.isfinite(d)] / d[np.isfinite(d)])
    # Depth along the ray relative to the surface there. Points hidden behind others in a frame count too, and at
    # 160x120 a pixel is 1 % of the depth: 5 % median, no bias. (On the 300-frame synthetic sequences, pairing each
    # frame with its nearest frames gave points 77 % too close: wrong matches.)
    # A third view confirms each point: 3.5 % of the points more than 20 % off (6 % with two views only).
    rel = np.concatenate(rel)
    assert abs(np.median(rel)) < 0.03 and np.median(np.abs(rel)) < 0.08, (np.median(rel), np.median(np.abs(rel)))
    assert np.mean(np.abs(rel) > 0.2) < 0.05


def test_map_of_images_only_refines_real_frames(real_bags, tmp_path):
    """Strecha entry-P10: 768x512 stills 18-24 m from the facade, no depth. `globloc map` triangulates features
    between the frames it keeps; each left-out frame starts 1 % of the scene depth and 1 deg off. A refinement is
    either taken and better, or refused with its reason (PnP at 20 m is loosely pinned)."""
    bag = real_bags / 'strecha_entry_p10'
    out = tmp_path / 'entry.map.npz'
    mapper.run(_args(bags=[bag], out=out, holdout='every:3', features=2000))
    place = pm.load_map(out)
    assert len(place.points) == 0 and len(place.feature_points) > 300 and place.meta["frames"] == 6
    rng = np.random.default_rng(0)
    taken = 0
    for f in [f for f in bg.read_sequence(bag, progress=False).frames if f.index % 3 == 0]:
        depth = np.median(np.linalg.norm(place.feature_points - f.T_map_cam[:3, 3], axis=1))
        T0 = _perturbed(f.T_map_cam, rng.normal(0, 0.01 * depth, 3), rng.normal(0, 1, 3))
        r = pm.refine_features(place, T0, f.image, f.K, PRIOR)
        if r.accepted:
            taken += 1
            assert _errors(r.T_map_cam, f.T_map_cam)[1] < _errors(T0, f.T_map_cam)[1]
            assert _errors(r.T_map_cam, f.T_map_cam)[0] < 0.012 * depth
        else:
            assert r.reason
    assert taken >= 2


def _recovered(place: pm.PlaceMap, frames: list, depth: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """(frames recovered, their (t m, r deg) errors (n, 2), each one's position std along its error (n,))."""
    errors, sigma = [], []
    for f in frames:
        r = pm.recover(place, f.image, f.K, f.depth if depth else None)
        assert r.accepted == (r.reason == ''), r.reason
        if r.accepted:
            errors.append(_errors(r.T_map_cam, f.T_map_cam))
            d = r.T_map_cam[:3, 3] - f.T_map_cam[:3, 3]
            u = d / np.linalg.norm(d)
            sigma.append(np.sqrt(u @ r.covariance[:3, :3] @ u))
    return len(errors), np.array(errors).reshape(-1, 2), np.array(sigma)


def test_recovery_localizes_real_frames_with_no_pose_to_start_from(real_bags):
    """SUN3D frag2 split by time: a map of the first 25 frames, the last 25 recovered from the image alone (and
    with their depth), no pose given. What recovery publishes is right and its covariance says how right."""
    frames = bg.read_sequence(real_bags / 'sun3d_frag2', progress=False).frames
    place = pm.build_map([pm.View(f.image, f.K, f.T_map_cam, f.depth) for f in frames[:25]])
    assert len(place.keyframe_bow) == place.meta['keyframes'] >= 2 and len(place.vocabulary) > 100
    for depth in (False, True):
        n, err, sigma = _recovered(place, frames[25:], depth)
        assert n >= 20 and err[:, 0].max() < 0.10 and err[:, 1].max() < 3.0, (depth, n, err)
        assert np.mean(err[:, 0] <= 3 * sigma) >= 0.9, (err[:, 0], sigma)
    # A map from before keyframe visibility (version 2) searches the keyframes' view cones instead.
    cones = dataclasses.replace(place, keyframe_features=np.zeros(0, np.int32),
                                keyframe_features_start=np.zeros(0, np.int64))
    n, err, _ = _recovered(cones, frames[25:], False)
    assert n >= 20 and err[:, 0].max() < 0.10, (n, err)
    # Frames of another room (frag1) are not in this map: nothing is published for them.
    other = bg.read_sequence(real_bags / 'sun3d_frag1', progress=False).frames[::5]
    assert _recovered(place, other, False)[0] == 0


def test_recovery_from_the_image_alone_where_the_room_is_metres_away(real_bags):
    """SUN3D frag1 split by time (the room seen from 3-4 m, 640x480): image-only recovery of the last 25 frames.
    Its accuracy rests on where the ORB keypoints are placed: 4 pyramid levels, not OpenCV's 8 (ORB_LEVELS), and
    spread over the image (detect): within 10 cm / 10 deg, 7 of 25 with 8 levels, 18 with 4 and the strongest
    features, 21 spread. None is published far off."""
    frames = bg.read_sequence(real_bags / 'sun3d_frag1', progress=False).frames
    place = pm.build_map([pm.View(f.image, f.K, f.T_map_cam, f.depth) for f in frames[:25]])
    assert place.spread_features
    n, err, _ = _recovered(place, frames[25:], False)
    assert n >= 20 and err[:, 0].max() < 0.25 and err[:, 1].max() < 10, (n, err)
    assert np.sum((err[:, 0] < 0.10) & (err[:, 1] < 10)) >= 20, err


def test_recovery_refuses_a_place_that_repeats_itself(real_bags):
    """Two alike rooms in one map: SUN3D frag1's first 25 frames, the even ones where they were recorded and the odd
    ones 10 m along x. A frame of either room fits both, so recovery must not publish (it put 14 of the last 25
    frames in the wrong room before it searched the keyframes away from its pose too)."""
    frames = bg.read_sequence(real_bags / 'sun3d_frag1', progress=False).frames
    away = np.eye(4)
    away[0, 3] = 10.0
    place = pm.build_map([pm.View(f.image, f.K, f.T_map_cam if f.index % 2 == 0 else away @ f.T_map_cam, f.depth)
                          for f in frames[:25]])
    results = [pm.recover(place, f.image, f.K, None) for f in frames[25:50:2]]
    assert not any(r.accepted for r in results), [r.T_map_cam[:3, 3] for r in results if r.accepted]
    assert sum('the place repeats itself' in r.reason for r in results) >= 10, [r.reason for r in results]


def test_recovery_on_an_outdoor_place_of_images_and_poses_only():
    """The castle place: a map triangulated from 30 stills (no depth, no landmarks), 9 query stills 0.8-2.5 m from
    the nearest map image. Repeated windows make wrong two-view matches; a third view must confirm each point."""
    place_dir = REPO / '..' / 'shared' / 'data' / 'places' / 'strecha_castle'
    if not place_dir.is_dir():
        pytest.skip(f'the castle place is not at {place_dir.resolve()}')
    views = [pm.View(f.image, f.K, f.T_map_cam, None)
             for f in bg.read_sequence(place_dir / 'map', progress=False).frames]
    place = pm.build_map(views)  # 2000 features a frame without depth: MAP_FEATURES_WITHOUT_DEPTH
    n, err, sigma = _recovered(place, bg.read_sequence(place_dir / 'query', progress=False).frames, False)
    assert n >= 7 and err[:, 0].max() < 0.25 and err[:, 1].max() < 1.0, (n, err)
    assert np.mean(err[:, 0] <= 3 * sigma) >= 0.9, (err[:, 0], sigma)


# ------------------------------------------------------------------------------------------------ Localizer
def test_a_recovery_where_the_map_also_fits_elsewhere_is_ambiguous():
    """The synthetic room's held-out frame 245 (data/scene): near its one-shot pose ICP fits the map but pins 5 of 6
    directions, and global recovery lands 1.62 m along the unpinned one, where the wall texture repeats. Such a
    pose (more than 25 cm or 10 deg from where the map also fits) is ambiguous and not published; one that agrees
    with it, or a recovery with nothing else fitting, is."""
    from globloc_ros.runtime import ambiguity
    T = np.eye(4)
    shifted = T.copy()
    shifted[:3, 3] = [1.62, 0.0, 0.0]
    turned = T.copy()
    turned[:3, :3] = cv2.Rodrigues(np.radians([0.0, 0.0, 15.0]))[0]
    near = T.copy()
    near[:3, :3], near[:3, 3] = cv2.Rodrigues(np.radians([0.0, 1.0, 0.0]))[0], [0.05, 0.0, 0.02]
    assert 'ambiguous' in ambiguity(T, [shifted]) and '1.62 m' in ambiguity(T, [shifted])
    assert 'ambiguous' in ambiguity(T, [near, turned]) and '15.0 deg' in ambiguity(T, [turned])
    assert ambiguity(T, [near]) == '' and ambiguity(T, []) == ''


def test_localizer_refines_confident_poses_and_recovers_the_others(tiny_model, scene_map, tmp_path):
    from globloc_ros.runtime import Localizer, LocalizerError

    model, _ = tiny_model
    place, frames = scene_map
    # The tiny model's poses are decimetres off: with the default gate none is confident, so the map is searched
    # from nothing (global recovery), and only a pose the map pins comes out.
    f = frames[0]
    r = Localizer(model, backend='torch', place_map=place).localize(f.image, f.K, f.depth)
    assert r.refinement.method.startswith('recovery') and r.path in ('recovered', 'rejected')
    assert r.confident == (r.path == 'recovered') == r.refinement.accepted
    # With the gate open, the refinement near the one-shot pose decides first: ICP with depth, features without;
    # what it refuses goes to recovery, and what recovery refuses is rejected (not the one-shot pose).
    gate_open = dict(max_residual_m=1e6, min_effective_points=0.0)
    plain = Localizer(model, backend='torch', **gate_open)
    lz = Localizer(model, backend='torch', place_map=place, **gate_open)
    unverified = Localizer(model, backend='torch', place_map=place, publish_unverified=True, **gate_open)
    paths = {'refined': 0, 'recovered': 0, 'rejected': 0}
    for f in frames[::3]:
        for depth in (f.depth, None):
            one_shot = plain.localize(f.image, f.K, depth)
            r = lz.localize(f.image, f.K, depth)
            want = pm.refine(place, one_shot.T_map_cam, f.image, f.K, depth, one_shot.covariance)
            assert want.method == ('icp' if depth is not None else 'features') and 'refine' in r.timings_ms
            paths[r.path] += 1
            assert np.array_equal(r.T_one_shot, one_shot.T_map_cam)
            verified = want.accepted and want.constrained == 6  # ICP against a wall alone does not verify
            if verified:
                assert r.path == 'refined' and np.allclose(r.T_map_cam, want.T_map_cam, atol=1e-9)
                assert np.allclose(r.covariance, want.covariance)
            else:
                assert r.path in ('recovered', 'rejected') and r.refinement.method.startswith('recovery')
                assert r.confident == (r.path == 'recovered')
                if r.path == 'rejected':
                    assert r.reason.startswith('not verified against the map: refined: ')
                    u = unverified.localize(f.image, f.K, depth)
                    assert u.confident and u.path == 'one-shot' and np.allclose(u.T_map_cam, one_shot.T_map_cam)
            # A prior at the true pose (a tracked stream) is refined from when the one-shot pose is not verified.
            t = lz.localize(f.image, f.K, depth, prior=(f.T_map_cam, PRIOR))
            assert t.path in (('refined',) if verified else ('tracked', 'recovered', 'rejected'))
    assert paths['refined'] > 0
    with pytest.raises(LocalizerError, match='map file not found: .*nope.npz'):
        Localizer(model, backend='torch', place_map=tmp_path / 'nope.npz')


def test_eval_reports_the_refined_share(tiny_model, tmp_path):
    from globloc import evaluate as ev

    model, scene = tiny_model
    pm.save_map(pm.build_map([_view(_wall())]), tmp_path / 'm.npz')
    r = ev.evaluate(model, [scene / 'seq_02'], split='every:8', place_map=tmp_path / 'm.npz')
    assert r['place_map'] == str(tmp_path / 'm.npz')
    assert r['refined_fraction'] == np.mean([f.get('refined', False) for f in r['per_frame']])
    with pytest.raises(ValueError, match='--map needs a scene-coordinate model run by the Localizer'):
        ev.evaluate(model, [scene / 'seq_02'], split='every:8', method='pnp', place_map=tmp_path / 'm.npz')


def test_eval_reports_paths_trust_and_coverage(tiny_model, scene_map, tmp_path, capsys):
    """`globloc eval --map --plots [--sequential]`: frames by path with the rejection reasons, wrong published
    poses, how many published positions lie within 3 sigma, recall against the distance from the map's cameras,
    and the plots of both."""
    from globloc import evaluate as ev

    model, scene = tiny_model
    place, _ = scene_map
    pm.save_map(place, tmp_path / 'scene.map.npz')
    r = ev.evaluate(model, [scene / 'seq_02'], place_map=tmp_path / 'scene.map.npz', depth=True,
                    plots_dir=tmp_path / 'plots')
    per_frame = r['per_frame']
    assert sum(r['paths'].values()) == r['frames'] == len(per_frame)
    assert r['published'] == r['frames'] - r['paths'].get('rejected', 0) == sum(f['confident'] for f in per_frame)
    wrong = [f for f in per_frame if f['confident'] and (f['translation_error_m'] >= ev.WRONG[0]
                                                          or f['rotation_error_deg'] >= ev.WRONG[1])]
    assert r['published_wrong'] == len(wrong) == 0  # RGB-D against a map: right or not published
    assert r['published'] > 0 and r['within_3_sigma'] >= 0.9
    assert sum(row['frames'] for row in r['coverage_by_distance']) == r['frames']
    assert sum(row['frames'] for row in r['coverage_by_angle']) == r['frames']
    assert all(0 <= row['one_shot_recall_10cm_10deg'] <= 1
               for row in r['coverage_by_distance'] + r['coverage_by_angle'])
    for name in ('error_vs_sigma.png', 'recall_vs_distance.png'):
        assert (tmp_path / 'plots' / name).stat().st_size > 10_000
    text = ev.format_summary(r)
    assert f"published {r['published']}, wrong" in text and 'from the map\'s cameras' in text
    # --sequential: the last published pose is the next frame's prior, so a frame the one-shot pose does not
    # bring near the map can be tracked; every frame is still scored.
    seq = ev.evaluate(model, [scene / 'seq_02'], place_map=tmp_path / 'scene.map.npz', depth=True, sequential=True)
    assert seq['frames'] == r['frames'] and seq['published'] >= r['published'] - 1 and seq['published_wrong'] == 0
    with pytest.raises(ValueError, match='--sequential needs --map'):
        ev.run(argparse.Namespace(model=str(model), bags=[scene / 'seq_02'], sequential=True, map=None, threads=None))


def test_eval_with_a_truncated_map_is_one_line_and_exit_code_2(tiny_model, scene_map, tmp_path):
    import subprocess
    import sys

    model, scene = tiny_model
    pm.save_map(scene_map[0], tmp_path / 'whole.map.npz')
    data = (tmp_path / 'whole.map.npz').read_bytes()
    (tmp_path / 'cut.map.npz').write_bytes(data[:len(data) // 3])  # a copy that was interrupted
    run = subprocess.run([sys.executable, '-m', 'globloc', 'eval', '--model', str(model), '--bags',
                          str(scene / 'seq_02'), '--map', str(tmp_path / 'cut.map.npz')],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f'globloc eval: error: {tmp_path / "cut.map.npz"}: not a readable globloc map file'), run.stderr
    assert 'Traceback' not in run.stderr
