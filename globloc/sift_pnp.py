"""SIFT + PnP-RANSAC: the classical relocalization baseline of `globloc relocalize-compare`. Torch-free.

    sift_map = build_sift_map(views)          # views: placemap.View(image, K, T_map_cam, depth or None)
    loc = SiftLocalizer(sift_map)
    T_map_cam, ok, extra = loc(image, K)      # ok False: no pose (fewer than MIN_INLIERS PnP inliers)

Map: SIFT features of the map frames with their map-frame points, from the same frames, depth and poses as the
place map (`globloc map`): a keypoint is back-projected with the recorded depth where the frame has depth (measured
and smooth around it); frames without depth triangulate between each other with the recorded poses (matches that
pass the ratio test and the epipolar line of the known poses, triangulated, reprojection and parallax tests; a
feature is kept when two of its frame pairs give the same point, the median of them: a wrong match along the
epipolar line, as repeated facade windows give, passes the reprojection tests but rarely gives the same point twice).
Query: SIFT on the image, each descriptor's two nearest map descriptors (FLANN kd-trees over all map descriptors),
Lowe's ratio test, PnP-RANSAC (AP3P) and a Levenberg-Marquardt refinement on the inliers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import cv2
import numpy as np

from globloc_ros.placemap import View, ratio_matches, triangulate_pair

SIFT_FEATURES = 2000  # per image, map and query
CONTRAST_THRESHOLD = 0.02  # OpenCV: 0.04; 0.02 finds 3x the keypoints in weak texture (SUN3D: 25 of 25 poses, not 18)
RATIO = 0.8  # Lowe's ratio test
PNP_ERROR_PX = 4.0  # RANSAC inlier threshold, pixels of the recorded image
PNP_ITERATIONS = 2000
MIN_INLIERS = 20  # fewer PnP inliers: no pose
FLANN_TREES, FLANN_CHECKS = 4, 64
# Triangulation (frames without depth): each frame is paired with up to PAIRS_PER_FRAME frames whose optical axes are
# within PAIR_MAX_ANGLE_DEG, spread from the nearest to the farthest (video and stills alike); a match must lie within
# EPIPOLAR_PX of the epipolar line of the known poses, reproject within that in both views, and its rays meet at
# MIN_PARALLAX_DEG or more; two triangulations of a feature agree when within AGREEMENT of its distance to the camera.
PAIRS_PER_FRAME, PAIR_MAX_ANGLE_DEG, EPIPOLAR_PX, MIN_PARALLAX_DEG, AGREEMENT = 8, 40.0, 2.0, 2.0, 0.02


@dataclass
class SiftMap:
    """points (N, 3) float32 map frame (metres), descriptors (N, 128) float32 SIFT; meta: how it was built."""
    points: np.ndarray
    descriptors: np.ndarray
    meta: dict = field(default_factory=dict)


def sift(n_features: int = SIFT_FEATURES) -> cv2.SIFT:
    return cv2.SIFT_create(nfeatures=n_features, contrastThreshold=CONTRAST_THRESHOLD)


def detect(image: np.ndarray, detector: cv2.SIFT) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB -> (uv (n, 2) float64 pixels, descriptors (n, 128) float32)."""
    kps, des = detector.detectAndCompute(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), None)
    if des is None:
        return np.zeros((0, 2)), np.zeros((0, 128), np.float32)
    return np.array([k.pt for k in kps], np.float64).reshape(-1, 2), des


def _backproject(uv: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    return np.stack([(uv[:, 0] - K[0, 2]) / K[0, 0] * z, (uv[:, 1] - K[1, 2]) / K[1, 1] * z, z], 1)


def depth_features(uv: np.ndarray, des: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints with measured depth, smooth in the 3x3 pixels around them (not on a depth edge) -> (map-frame
    points (m, 3), their descriptors (m, 128))."""
    d = np.asarray(view.depth, np.float64)
    H, W = d.shape
    sx, sy = W / view.image.shape[1], H / view.image.shape[0]  # depth registered to the image, maybe another size
    u = np.clip(np.round((uv[:, 0] + 0.5) * sx - 0.5).astype(int), 0, W - 1)
    v = np.clip(np.round((uv[:, 1] + 0.5) * sy - 0.5).astype(int), 0, H - 1)
    patch = np.stack([d[np.clip(v + dv, 0, H - 1), np.clip(u + du, 0, W - 1)]
                      for dv in (-1, 0, 1) for du in (-1, 0, 1)])
    z = patch[4]
    with np.errstate(invalid='ignore'):
        ok = np.isfinite(patch).all(0) & (z > 0) & (patch.max(0) - patch.min(0) < 0.05 * z)
    X = _backproject(uv[ok], z[ok], view.K)
    return X @ view.T_map_cam[:3, :3].T + view.T_map_cam[:3, 3], des[ok]


def _pairs(poses: list[np.ndarray]) -> list[tuple[int, int]]:
    """Frame pairs to triangulate between (see PAIRS_PER_FRAME)."""
    C = np.array([T[:3, 3] for T in poses])
    Z = np.array([T[:3, 2] for T in poses])
    dist = np.linalg.norm(C[:, None] - C[None], axis=-1)
    similar = Z @ Z.T >= np.cos(np.radians(PAIR_MAX_ANGLE_DEG))
    np.fill_diagonal(similar, False)
    pairs = set()
    for i in range(len(poses)):
        js = np.flatnonzero(similar[i])
        js = js[np.argsort(dist[i, js])]
        pick = js[np.unique(np.linspace(0, len(js) - 1, min(PAIRS_PER_FRAME, len(js))).round().astype(int))] \
            if len(js) else js
        pairs |= {(min(i, j), max(i, j)) for j in pick}
    return sorted(pairs)


def _epipolar_distance(uv_i: np.ndarray, uv_j: np.ndarray, K_i, T_i, K_j, T_j) -> np.ndarray:
    """Symmetric distance (px) of matched pixels to each other's epipolar lines under the known poses."""
    T_j_i = np.linalg.inv(T_j) @ T_i  # camera i -> camera j
    R, t = T_j_i[:3, :3], T_j_i[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(K_j).T @ tx @ R @ np.linalg.inv(K_i)
    a = np.c_[uv_i, np.ones(len(uv_i))]
    b = np.c_[uv_j, np.ones(len(uv_j))]
    l_j, l_i = a @ F.T, b @ F  # lines in j and in i
    e = np.abs(np.sum(b * l_j, 1))
    return np.maximum(e / np.linalg.norm(l_j[:, :2], axis=1), e / np.linalg.norm(l_i[:, :2], axis=1))


def triangulate(features: list[tuple[np.ndarray, np.ndarray]], Ks: list[np.ndarray],
                poses: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    """SIFT features [(uv, descriptors)] of frames without depth, with their K and T_map_cam -> (map-frame points
    (m, 3), descriptors (m, 128), stats): one row per frame feature that two frame pairs triangulate to the same
    point (the median of its triangulations)."""
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    candidates: dict[tuple[int, int], list[np.ndarray]] = {}
    pairs = _pairs(poses)
    for i, j in pairs:
        (uv_i, des_i), (uv_j, des_j) = features[i], features[j]
        if len(des_i) < 2 or len(des_j) < 2:
            continue
        a, b = ratio_matches(matcher, des_i, des_j)
        ok = _epipolar_distance(uv_i[a], uv_j[b], Ks[i], poses[i], Ks[j], poses[j]) < EPIPOLAR_PX
        a, b = a[ok], b[ok]
        if not len(a):
            continue
        X, ok = triangulate_pair(uv_i[a], uv_j[b], Ks[i], poses[i], Ks[j], poses[j], EPIPOLAR_PX, MIN_PARALLAX_DEG)
        for k in np.flatnonzero(ok):
            candidates.setdefault((i, int(a[k])), []).append(X[k])
            candidates.setdefault((j, int(b[k])), []).append(X[k])
    points, descriptors = [np.zeros((0, 3))], [np.zeros((0, 128), np.float32)]
    for (f, k), Xs in candidates.items():
        if len(Xs) < 2:
            continue
        X = np.median(Xs, 0)
        r = np.linalg.norm(X - poses[f][:3, 3])
        if sum(np.linalg.norm(x - X) <= AGREEMENT * r for x in Xs) >= 2:
            points.append(X[None])
            descriptors.append(features[f][1][k][None])
    return np.concatenate(points), np.concatenate(descriptors), {'pairs': len(pairs),
                                                                 'triangulated_candidates': len(candidates)}


def build_sift_map(views: Iterable[View], n_features: int = SIFT_FEATURES) -> SiftMap:
    """Map frames -> SiftMap (module doc). Raises ValueError when no feature gets a 3D point."""
    detector = sift(n_features)
    points, descriptors = [np.zeros((0, 3))], [np.zeros((0, 128), np.float32)]
    without = ([], [], [])  # features, K, T_map_cam of frames without depth
    frames = with_depth = 0
    for view in views:
        frames += 1
        uv, des = detect(view.image, detector)
        if view.depth is not None:
            with_depth += 1
            X, d = depth_features(uv, des, view)
            points.append(X)
            descriptors.append(d)
        else:
            for lst, x in zip(without, ((uv, des), np.asarray(view.K, np.float64),
                                        np.asarray(view.T_map_cam, np.float64))):
                lst.append(x)
    stats = {}
    if len(without[0]) >= 2:
        X, d, stats = triangulate(*without)
        points.append(X)
        descriptors.append(d)
    sift_map = SiftMap(np.concatenate(points).astype(np.float32), np.concatenate(descriptors).astype(np.float32),
                       {'frames': frames, 'frames_with_depth': with_depth, 'features_per_image': n_features,
                        **stats})
    sift_map.meta['points'] = len(sift_map.points)
    if len(sift_map.points) < MIN_INLIERS:
        raise ValueError(f'SIFT map: {len(sift_map.points)} features with a 3D point from {frames} frames '
                         f'({with_depth} with depth): too few to localize against')
    return sift_map


class SiftLocalizer:
    """image (H, W, 3) uint8 RGB + K (3, 3) -> (T_map_cam (4, 4), ok, extra {'matches', 'inliers'}); ok False
    (no pose) with fewer than MIN_INLIERS RANSAC inliers."""

    def __init__(self, sift_map: SiftMap, n_features: int = SIFT_FEATURES, seed: int = 0):
        self.map = sift_map
        self.detector = sift(n_features)
        self.matcher = cv2.FlannBasedMatcher({'algorithm': 1, 'trees': FLANN_TREES}, {'checks': FLANN_CHECKS})
        self.matcher.add([sift_map.descriptors])
        # The kd-trees are built here, not at the first frame, from OpenCV's RNG: seeded, else the baseline's rows
        # depend on what drew from it before in the process (SUN3D frag1's median: 3.7-4.5 cm across seeds).
        cv2.setRNGSeed(seed)
        self.matcher.train()
        self.seed = seed

    def __call__(self, image: np.ndarray, K: np.ndarray):
        uv, des = detect(image, self.detector)
        none = lambda **extra: (np.eye(4), False, {'matches': 0, 'inliers': 0, **extra})  # noqa: E731
        if len(des) < MIN_INLIERS:
            return none()
        good = [a for a, b in (m for m in self.matcher.knnMatch(des, k=2) if len(m) == 2)
                if a.distance < RATIO * b.distance]
        if len(good) < MIN_INLIERS:
            return none(matches=len(good))
        obj = self.map.points[[m.trainIdx for m in good]].astype(np.float64)
        img = uv[[m.queryIdx for m in good]]
        K = np.asarray(K, np.float64)
        cv2.setRNGSeed(self.seed)
        ok, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, K, None, iterationsCount=PNP_ITERATIONS,
                                                 reprojectionError=PNP_ERROR_PX, confidence=0.999,
                                                 flags=cv2.SOLVEPNP_AP3P)
        n_inl = 0 if inl is None else len(inl)
        if not ok or n_inl < MIN_INLIERS:
            return none(matches=len(good), inliers=n_inl)
        inl = inl.ravel()
        rvec, tvec = cv2.solvePnPRefineLM(obj[inl], img[inl], K, None, rvec, tvec)
        R = cv2.Rodrigues(rvec)[0]
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R.T, -R.T @ tvec.ravel()
        return T, bool(np.isfinite(T).all()), {'matches': len(good), 'inliers': n_inl}
