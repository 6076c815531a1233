"""`globloc synth`: a synthetic multi-sequence scene written as rosbag2 bags of the data contract.

The scene is a textured room (about 6 x 5 x 3 m; map frame: x, y on the floor, z up, metres) with a few
box-shaped pieces of furniture, rendered by analytic ray casting in numpy: every pixel's ray is
intersected with the room's six planes and the boxes. Surfaces carry real photographs from
`skimage.data`, mapped by world coordinates and tiled, so the scene has repeated structure, like real
rooms. Lighting is a per-sequence gain and colour tint times a soft directional and lamp term;
one training sequence (`seq_01`) is lit clearly darker and warmer.

Each sequence is a smooth loop around the middle of the room, looking towards the walls with some yaw
and pitch wobble; loops differ in radius, height and phase. The last sequence is held out for testing:
its loop interpolates between the first two training loops, so it passes through the region they cover.
With --detour M,DEG it leaves them for a stretch (up to M metres inwards and down, DEG degrees of yaw):
the views a robot has off its mapping path, where a one-shot network is far from what it was trained on.

Written per sequence (DIR/seq_00, seq_01, ...; sorted order = sequence id): raw rgb8 images, CameraInfo
(fx = fy = 0.8 W, no distortion), exact 32FC1 depth (z along the optical axis), PoseStamped ground
truth, landmarks drawn from depth + pose at the label fraction, and the explicit pose graph
(graph.derive_edges_from_poses over all sequences; an edge lives in the bag of its first frame's
sequence). DIR/scene.json records the parameters. The output depends only on the arguments.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from globloc import bags, graph

ROOM_MIN = np.array([0.0, 0.0, 0.0])
ROOM_MAX = np.array([6.0, 5.0, 3.0])
CENTRE = np.array([3.0, 2.5])
HZ = 10
DETOUR_STRETCH = (0.35, 0.7)  # --detour: the part of the held-out loop (fractions) that leaves the training paths
STAMP_BASE_NS = 1_700_000_000 * 10**9
SEQ_STAMP_OFFSET_NS = 10_000 * 10**9  # sequences get disjoint stamps, so a stamp names one frame
TEXTURE_SIZE = 256
MIP_LEVELS = 5

# Materials: (skimage.data image, tint for grey images, tile size in metres). The tile size sets how often a
# photograph repeats along a surface.
MATERIALS = {
    'floor': ('gravel', (0.75, 0.62, 0.48), 1.0),
    'ceiling': ('moon', (0.95, 0.95, 0.92), 1.5),
    'wall_x0': ('brick', (0.85, 0.55, 0.45), 1.2),
    'wall_x1': ('coffee', None, 1.5),
    'wall_y0': ('astronaut', None, 1.6),
    'wall_y1': ('rocket', None, 1.6),
    'table': ('immunohistochemistry', None, 0.8),
    'cabinet': ('hubble_deep_field', None, 1.0),
    'shelf': ('camera', (0.7, 0.75, 0.85), 0.9),
    'crate': ('grass', (0.55, 0.8, 0.45), 0.6),
    'chest': ('colorwheel', None, 0.7),
    'poster': ('chelsea', None, 1.5),
}
# Room faces in the order (x min, x max, y min, y max, z min, z max).
ROOM_FACES = ('wall_x0', 'wall_x1', 'wall_y0', 'wall_y1', 'floor', 'ceiling')
# Furniture: (material, min corner, max corner); all clear of the camera paths.
BOXES = (
    ('table', (1.0, 3.6, 0.0), (2.2, 4.4, 0.75)),
    ('cabinet', (5.3, 0.3, 0.0), (5.9, 1.8, 1.9)),
    ('shelf', (0.1, 0.5, 0.0), (0.5, 2.0, 2.2)),
    ('crate', (3.8, 0.2, 0.0), (4.5, 0.8, 0.6)),
    ('chest', (4.5, 4.2, 0.0), (5.2, 4.8, 1.0)),
    ('poster', (2.0, 4.96, 1.2), (3.5, 5.0, 2.2)),
)


@dataclass(frozen=True)
class Lighting:
    """Per-sequence light: gain, RGB tint, direction the light travels (map frame), ceiling lamp position."""
    gain: float
    tint: tuple[float, float, float]
    direction: tuple[float, float, float]
    lamp: tuple[float, float, float]


NORMAL_LIGHT = Lighting(1.0, (1.0, 1.0, 1.0), (0.3, 0.5, -0.8), (3.0, 2.5, 2.9))
CHANGED_LIGHT = Lighting(0.55, (1.0, 0.78, 0.55), (-0.6, -0.2, -0.75), (1.5, 4.0, 2.9))


@dataclass(frozen=True)
class Loop:
    """A loop around the room centre: radii (m), camera height (m), start phase (rad), wobble phases."""
    rx: float
    ry: float
    height: float
    phase: float
    yaw_amp: float
    yaw_phase: float
    pitch_phase: float


def camera_matrix(width: int, height: int) -> np.ndarray:
    """(3, 3) intrinsics: fx = fy = 0.8 W, principal point at the image centre (pixel-centre convention)."""
    f = 0.8 * width
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """T_map_cam (4, 4) of an optical frame at `position` looking at `target`, image rows along -z (map up)."""
    f = target - position
    f = f / np.linalg.norm(f)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r = r / np.linalg.norm(r)
    d = np.cross(f, r)
    T = np.eye(4)
    T[:3, :3] = np.stack([r, d, f], axis=1)
    T[:3, 3] = position
    return T


def sequence_paths(sequences: int, rng: np.random.Generator) -> list[Loop]:
    """Loops for the training sequences, then the held-out loop between the first two training loops."""
    if sequences < 2:
        raise ValueError(f'need at least 2 sequences (training + held-out test), got {sequences}')
    shapes = [(1.15, 0.85, 1.35), (0.8, 0.6, 1.75), (1.0, 0.95, 1.55), (0.9, 0.7, 1.2)]
    train = []
    for s in range(sequences - 1):
        rx, ry, h = shapes[s % len(shapes)]
        jitter = rng.uniform(-0.05, 0.05, size=3)
        train.append(Loop(rx + jitter[0], ry + jitter[1], h + jitter[2], rng.uniform(0, 2 * np.pi),
                           rng.uniform(0.15, 0.3), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)))
    a, b = train[0], train[min(1, len(train) - 1)]
    test = Loop((a.rx + b.rx) / 2, (a.ry + b.ry) / 2, (a.height + b.height) / 2, rng.uniform(0, 2 * np.pi),
                 (a.yaw_amp + b.yaw_amp) / 2, rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))
    return train + [test]


def detour(poses: np.ndarray, metres: float, degrees: float, stretch: tuple[float, float] = DETOUR_STRETCH
           ) -> np.ndarray:
    """poses (N, 4, 4) T_map_cam along a loop, with the frames in `stretch` (fractions of the loop) moved up to
    `metres` towards the room centre and down (0.8 : 0.6) and turned up to `degrees` about the vertical, in a
    smooth bump (sin^2): views away from those any training sequence recorded."""
    out = poses.copy()
    n = len(poses)
    for k in range(n):
        x = (k / n - stretch[0]) / (stretch[1] - stretch[0])
        if not 0 < x < 1:
            continue
        w = np.sin(np.pi * x) ** 2
        inward = np.array([CENTRE[0], CENTRE[1], poses[k, 2, 3]]) - poses[k, :3, 3]
        away = 0.8 * inward / max(np.linalg.norm(inward), 1e-9) + [0.0, 0.0, -0.6]  # unit: inwards and down
        out[k, :3, 3] += w * metres * away
        a = np.radians(w * degrees)
        Rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        out[k, :3, :3] = Rz @ poses[k, :3, :3]
    return out


def path_poses(p: Loop, frames: int) -> np.ndarray:
    """(frames, 4, 4) T_map_cam along one full loop: the camera looks ahead-outwards at the walls."""
    phi = p.phase + 2 * np.pi * np.arange(frames) / frames
    out = np.empty((frames, 4, 4))
    for k, a in enumerate(phi):
        pos = np.array([CENTRE[0] + p.rx * np.cos(a), CENTRE[1] + p.ry * np.sin(a),
                        p.height + 0.1 * np.sin(3 * a)])
        psi = a + 1.0 + p.yaw_amp * np.sin(2 * a + p.yaw_phase)
        target = np.array([CENTRE[0] + 2.9 * np.cos(psi), CENTRE[1] + 2.4 * np.sin(psi),
                           1.3 + 0.35 * np.sin(2 * a + p.pitch_phase)])
        out[k] = look_at(pos, target)
    return out


def _load_textures() -> dict[str, list[np.ndarray]]:
    """Material name -> mip pyramid of (S, S, 3) float32 RGB in [0, 1], S = 256, 128, ..."""
    import skimage.data

    out = {}
    for name, (image, tint, _) in MATERIALS.items():
        img = getattr(skimage.data, image)().astype(np.float32) / 255.0
        if img.ndim == 2:
            img = img[:, :, None] * np.asarray(tint, dtype=np.float32)
        img = cv2.resize(img[:, :, :3], (TEXTURE_SIZE, TEXTURE_SIZE), interpolation=cv2.INTER_AREA)
        levels = [img]
        for _ in range(MIP_LEVELS - 1):
            levels.append(cv2.resize(levels[-1], (levels[-1].shape[1] // 2, levels[-1].shape[0] // 2),
                                     interpolation=cv2.INTER_AREA))
        out[name] = levels
    return out


def _bilinear_wrap(tex: np.ndarray, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Sample (S, S, 3) texture at texel coordinates (s right, t down), wrapping around: (N, 3)."""
    n = tex.shape[0]
    s0, t0 = np.floor(s - 0.5), np.floor(t - 0.5)
    a, b = (s - 0.5 - s0)[:, None], (t - 0.5 - t0)[:, None]
    s0, t0 = s0.astype(np.int64) % n, t0.astype(np.int64) % n
    s1, t1 = (s0 + 1) % n, (t0 + 1) % n
    return ((1 - a) * (1 - b) * tex[t0, s0] + a * (1 - b) * tex[t0, s1]
            + (1 - a) * b * tex[t1, s0] + a * b * tex[t1, s1])


class Renderer:
    """Ray caster for the room at one image size. render(T_map_cam, lighting) -> (RGB uint8, depth float32).

    Arrays are laid out (3, N) (one row per coordinate): numpy's (N, 3) @ (3, 3) and reductions over a
    length-3 last axis are tens of times slower than the same work on rows.
    """

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.K = camera_matrix(width, height)
        u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        # Rays with unit z in the camera frame, so the hit distance along them is the depth z itself.
        self.rays_cam = np.stack([(u - self.K[0, 2]) / self.K[0, 0], (v - self.K[1, 2]) / self.K[1, 1],
                                  np.ones_like(u)]).reshape(3, -1)
        self.ray_len = np.sqrt((self.rays_cam ** 2).sum(0))
        self.textures = _load_textures()
        self.materials = list(ROOM_FACES) + [b[0] for b in BOXES]
        self.boxes = [(np.array(lo), np.array(hi)) for _, lo, hi in BOXES]

    def render(self, T_map_cam: np.ndarray, light: Lighting) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB and (H, W) float32 depth in metres (z along the optical axis)."""
        o = T_map_cam[:3, 3]
        d = T_map_cam[:3, :3] @ self.rays_cam
        with np.errstate(divide='ignore', invalid='ignore'):
            inv = 1.0 / d  # +-inf where a ray is parallel to an axis: the slab tests below stay correct
            # Room: the camera is inside, so the ray leaves through the nearest of the three far planes.
            t_axes = [(np.where(d[a] > 0, ROOM_MAX[a], ROOM_MIN[a]) - o[a]) * inv[a] for a in range(3)]
            t = np.minimum(np.minimum(t_axes[0], t_axes[1]), t_axes[2])
            axis = np.where(t == t_axes[0], 0, np.where(t == t_axes[1], 1, 2))
            face = 2 * axis + (np.choose(axis, d) > 0)
            for b, (lo, hi) in enumerate(self.boxes):
                # Slab test; the camera is outside every box, so a hit enters it at t_near > 0.
                t1 = [(lo[a] - o[a]) * inv[a] for a in range(3)]
                t2 = [(hi[a] - o[a]) * inv[a] for a in range(3)]
                tmin = [np.minimum(x, y) for x, y in zip(t1, t2)]
                near = np.maximum(np.maximum(tmin[0], tmin[1]), tmin[2])
                far = np.minimum(np.minimum(np.maximum(t1[0], t2[0]), np.maximum(t1[1], t2[1])),
                                 np.maximum(t1[2], t2[2]))
                closer = np.flatnonzero((near > 0) & (near < t) & (near <= far))
                if closer.size:
                    t[closer] = near[closer]
                    axis[closer] = np.where(near[closer] == tmin[0][closer], 0,
                                            np.where(near[closer] == tmin[1][closer], 1, 2))
                    face[closer] = 6 + b
        color = self._shade(o[:, None] + t * d, t, axis, face, d, light)
        image = np.clip(np.round(color * 255.0), 0, 255).astype(np.uint8).T.reshape(self.height, self.width, 3)
        return image, t.astype(np.float32).reshape(self.height, self.width)

    def _shade(self, p, t, axis, face, d, light: Lighting) -> np.ndarray:
        """Colour (3, N) in [0, 1]-ish of hits p (3, N) at ray parameter t (N,) on faces of `axis` (N,)."""
        n = len(t)
        d_axis = np.choose(axis, d)
        # Texture coordinates: the two world axes spanning the surface; z runs up the image of a wall.
        s_world = np.where(axis == 0, p[1], p[0])
        t_world = np.where(axis == 2, p[1], p[2])
        cos_inc = np.abs(d_axis) / self.ray_len  # |d| == ray_len: rotation keeps lengths
        footprint_m = t * self.ray_len / self.K[0, 0] / np.maximum(cos_inc, 0.2)
        albedo = np.empty((n, 3), dtype=np.float32)
        for m, name in enumerate(self.materials):
            sel = np.flatnonzero(face == m)
            if sel.size == 0:
                continue
            tile = MATERIALS[name][2]
            pyramid = self.textures[name]
            texels = footprint_m[sel] * TEXTURE_SIZE / tile
            # Mip level by pixel footprint: no shimmering from minified photographs.
            level = np.clip(np.round(np.log2(np.maximum(texels, 1e-6))), 0, MIP_LEVELS - 1).astype(np.int64)
            for lv in np.unique(level):
                k = sel[level == lv]
                size = pyramid[lv].shape[0]
                s = np.mod(s_world[k] / tile, 1.0) * size
                tt = (1.0 - np.mod(t_world[k] / tile, 1.0)) * size
                albedo[k] = _bilinear_wrap(pyramid[lv], s, tt)
        # Outward normal n = -sign(d_axis) e_axis, so n . l is a pick of one light component.
        to_light = -np.asarray(light.direction) / np.linalg.norm(light.direction)
        n_dot_l = -np.sign(d_axis) * to_light[axis]
        lamp_d2 = ((p - np.asarray(light.lamp)[:, None]) ** 2).sum(0)
        shade = (0.6 + 0.4 * np.clip(n_dot_l, 0.0, 1.0)) * (0.75 + 0.25 * np.exp(-lamp_d2 / 12.5))
        return albedo.T * (shade * light.gain) * np.asarray(light.tint)[:, None]


def edge_records(edges: list[graph.Edge], seq: np.ndarray, stamp_ns: np.ndarray) -> list[bags.EdgeRecord]:
    """Edges -> PoseGraphEdge records; seq (N,) and stamp_ns (N,) describe the global frames."""
    return [bags.EdgeRecord(seq_i=int(seq[e.i]), stamp_i_ns=int(stamp_ns[e.i]), seq_j=int(seq[e.j]),
                            stamp_j_ns=int(stamp_ns[e.j]), kind=e.kind, T_i_j=e.T_i_j, covariance=e.covariance)
            for e in edges]


def generate(out, seed: int = 0, frames: int = 300, sequences: int = 3, size: tuple[int, int] = (320, 240),
             label_fraction: float = 0.005, force: bool = False, progress: bool = True,
             detour_m_deg: tuple[float, float] | None = None) -> dict:
    """Write the scene to `out` (see module docstring); returns what scene.json holds. detour_m_deg: (metres,
    degrees) the held-out sequence leaves the training paths by, for a stretch (detour); None: it does not."""
    out = Path(out)
    bags.check_label_fraction(label_fraction)
    if frames < 1:
        raise ValueError(f'frames must be >= 1, got {frames}')
    names = [f'seq_{s:02d}' for s in range(sequences)]
    existing = [out / n for n in names if (out / n).exists()] + [p for p in [out / 'scene.json'] if p.exists()]
    if existing and not force:
        raise ValueError(f'{out}: already holds {", ".join(p.name for p in existing)}; use --force')
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    paths = sequence_paths(sequences, rng)
    changed = 1 if sequences > 2 else None  # a training sequence, never the held-out one
    lights = [CHANGED_LIGHT if s == changed else NORMAL_LIGHT for s in range(sequences)]
    per_seq = [path_poses(p, frames) for p in paths]
    if detour_m_deg is not None:
        per_seq[-1] = detour(per_seq[-1], *detour_m_deg)
    poses = np.concatenate(per_seq)
    seq_of = np.repeat(np.arange(sequences), frames)
    stamps = (STAMP_BASE_NS + seq_of * SEQ_STAMP_OFFSET_NS
              + np.tile(np.arange(frames), sequences) * (10**9 // HZ)).astype(np.int64)
    edges = graph.derive_edges_from_poses(poses, seq_of, seed=seed)
    records = edge_records(edges, seq_of, stamps)

    renderer = Renderer(*size)
    bar = tqdm(total=frames * sequences, desc='synth', unit='frame', disable=not progress)

    def frames_of(s: int):
        for k in range(frames):
            g = s * frames + k
            image, depth = renderer.render(poses[g], lights[s])
            labels = bags.labels_from_depth(depth, renderer.K, poses[g], label_fraction,
                                            bags.label_rng(seed, stamps[g]))
            bar.update(1)
            yield bags.Frame(seq=s, index=k, stamp_ns=int(stamps[g]), image=image, K=renderer.K.copy(),
                             T_map_cam=poses[g], depth=depth, landmarks=labels)

    for s, name in enumerate(names):
        bags.write_sequence(out / name, frames_of(s), edges=[r for r in records if r.seq_i == s])
    bar.close()

    scene = {
        'seed': seed, 'frames_per_sequence': frames, 'sequences': names, 'size': list(size), 'hz': HZ,
        'K': renderer.K.tolist(), 'label_fraction': label_fraction,
        'room_min_m': ROOM_MIN.tolist(), 'room_max_m': ROOM_MAX.tolist(),
        'boxes': [{'material': m, 'min_m': list(lo), 'max_m': list(hi)} for m, lo, hi in BOXES],
        'materials': {k: {'image': v[0], 'tile_m': v[2]} for k, v in MATERIALS.items()},
        'paths': [p.__dict__ for p in paths],
        'lighting': [lights[s].__dict__ for s in range(sequences)],
        'held_out': names[-1], 'train': names[:-1],
        'held_out_detour': None if detour_m_deg is None else {'metres': detour_m_deg[0], 'degrees': detour_m_deg[1],
                                                               'stretch': list(DETOUR_STRETCH)}, 'changed_lighting': names[changed] if changed else None,
        'edges': graph.edge_counts(edges),
    }
    (out / 'scene.json').write_text(json.dumps(scene, indent=2) + '\n')
    return scene


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', required=True, help='output folder (one bag folder per sequence)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--frames', type=int, default=300, help='frames per sequence (10 Hz)')
    parser.add_argument('--sequences', type=int, default=3, help='sequences; the last is held out')
    parser.add_argument('--size', type=bags.parse_size, default=(320, 240), help='image size WxH')
    parser.add_argument('--label-fraction', type=float, default=0.005, help='landmarks per pixel, in (0, 1]')
    parser.add_argument('--force', action='store_true', help='replace an existing scene in --out')
    parser.add_argument('--detour', type=_metres_degrees, default=None, metavar='M,DEG',
                        help='a hard held-out pass: for a third of its loop it leaves the training paths by up to M '
                             'metres (inwards and down) and DEG degrees (yaw), e.g. 0.5,50')


def _metres_degrees(text: str) -> tuple[float, float]:
    try:
        m, d = (float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected M,DEG (e.g. 0.5,50), got {text!r}') from None
    return m, d


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    scene = generate(args.out, seed=args.seed, frames=args.frames, sequences=args.sequences, size=args.size,
                     label_fraction=args.label_fraction, force=args.force, detour_m_deg=args.detour)
    print(f'wrote {len(scene["sequences"])} x {args.frames} frames to {args.out} in '
          f'{time.perf_counter() - t0:.1f} s; held out: {scene["held_out"]}, changed lighting: '
          f'{scene["changed_lighting"]}; edges: {scene["edges"]}')
    return 0
