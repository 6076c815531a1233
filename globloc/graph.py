"""The relative-pose graph over all frames of all sequences (METHOD.md section 4, L_rel).

Frames are numbered globally: index = position in the concatenation of all sequences' frames, in
sequence order. An edge (i, j) carries T_i_j = T_map_i^-1 T_map_j (frame j's optical frame in frame i's,
metres) and a 6x6 covariance in the order (x, y, z, rot x, rot y, rot z).

- ADJACENT edges join frames 1..k apart within a sequence.
- DISTANT edges join frames of different sequences, or of one sequence at least `distant_min_gap_frames`
  apart, whose camera centres lie within a radius and whose optical axes lie within an angle.

Edges come either from the bags' graph topic (`edges_from_bags`) or from the poses (`derive_edges`); both need
only each bag's stamps and poses (a `bags.Track`), never its images, so a long recording's graph is built while
its frames stream past. The bag layer imports this module, not the reverse.
Deriving assumes that all sequences share one map frame: do not derive distant edges across bags
with unrelated maps (e.g. the SUN3D fragments, or different Strecha scenes).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from globloc_ros import frames as fr

if TYPE_CHECKING:  # for the annotations only: bags imports this module
    from globloc import bags

ADJACENT, DISTANT = 0, 1
KIND_NAMES = {ADJACENT: 'adjacent', DISTANT: 'distant'}
# Derived edges come from ground-truth poses, so their uncertainty is that of the GT itself: about
# 1 cm and 0.5 degree (standard deviations), a typical figure for SLAM / motion-capture references.
GT_SIGMA_T_M = 0.01
GT_SIGMA_R_RAD = float(np.radians(0.5))


@dataclass(slots=True)
class Edge:
    """i, j: global frame indices (i < j for derived edges); kind: ADJACENT or DISTANT.

    T_i_j (4, 4) = T_map_i^-1 T_map_j; covariance (6, 6) of T_i_j, (x, y, z, rot x, rot y, rot z).
    """
    i: int
    j: int
    kind: int
    T_i_j: np.ndarray
    covariance: np.ndarray


def gt_covariance() -> np.ndarray:
    """(6, 6) diagonal covariance given to edges derived from ground-truth poses."""
    return np.diag([GT_SIGMA_T_M ** 2] * 3 + [GT_SIGMA_R_RAD ** 2] * 3)


def derive_edges_from_poses(T_map_cam: np.ndarray, seq: np.ndarray, adjacent_k: int = 3,
                            distant_radius_m: float = 1.0, distant_angle_deg: float = 30.0,
                            distant_min_gap_frames: int = 30, max_distant_per_frame: int = 8,
                            seed: int = 0) -> list[Edge]:
    """Edges from poses alone. T_map_cam (N, 4, 4) in global frame order; seq (N,) sequence id per frame.

    Frames of one sequence must be contiguous and in time order. Each frame picks at most
    `max_distant_per_frame` distant partners at random (seeded); the resulting pairs are de-duplicated,
    so a frame can end up in more distant edges when other frames pick it.
    """
    T = np.asarray(T_map_cam, dtype=np.float64)
    seq = np.asarray(seq)
    n = T.shape[0]
    local = np.zeros(n, dtype=np.int64)  # index within its sequence
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], n]):
        local[a:b] = np.arange(b - a)

    pairs_adj = []
    for d in range(1, adjacent_k + 1):
        i = np.arange(n - d)
        i = i[seq[i] == seq[i + d]]
        pairs_adj.append(np.stack([i, i + d], axis=1))
    adj = np.concatenate(pairs_adj) if pairs_adj else np.zeros((0, 2), dtype=np.int64)
    adj = adj[np.lexsort((adj[:, 1], adj[:, 0]))]

    centres, axes = T[:, :3, 3], T[:, :3, 2]  # optical axis = third column of R
    cos_min = np.cos(np.radians(distant_angle_deg))
    rng = np.random.default_rng(seed)
    picked = []
    block = max(1, (1 << 21) // max(n, 1))  # rows per block: 2M pairs, 16 MB per float64 array, whatever N
    for a in range(0, n, block):
        rows = slice(a, min(a + block, n))
        # Component by component: numpy is slow at reducing over a length-3 last axis.
        d2 = sum((centres[rows, k, None] - centres[None, :, k]) ** 2 for k in range(3))
        cos = sum(axes[rows, k, None] * axes[None, :, k] for k in range(3))
        ok = (d2 <= distant_radius_m ** 2) & (cos >= cos_min)
        same = seq[rows, None] == seq[None, :]
        ok &= ~same | (np.abs(local[rows, None] - local[None, :]) >= distant_min_gap_frames)
        ok[np.arange(ok.shape[0]), np.arange(rows.start, rows.stop)] = False  # never a frame with itself
        # Up to max_distant_per_frame random candidates per row: the smallest random keys among the valid.
        keys = np.where(ok, rng.random(ok.shape), np.inf)
        m = min(max_distant_per_frame, n)
        cols = np.argpartition(keys, m - 1, axis=1)[:, :m] if m else np.zeros((ok.shape[0], 0), np.int64)
        r = np.broadcast_to(np.arange(rows.start, rows.stop)[:, None], cols.shape)
        keep = np.isfinite(np.take_along_axis(keys, cols, axis=1))
        picked.append(np.stack([np.minimum(r[keep], cols[keep]), np.maximum(r[keep], cols[keep])], axis=1))
    dist = np.unique(np.concatenate(picked), axis=0) if picked else np.zeros((0, 2), dtype=np.int64)

    cov = gt_covariance()
    cov.setflags(write=False)  # one shared array for all derived edges
    edges = []
    for kind, pairs in ((ADJACENT, adj), (DISTANT, dist)):
        if len(pairs) == 0:
            continue
        rel = fr.relative_pose(T[pairs[:, 0]], T[pairs[:, 1]])
        edges += [Edge(int(i), int(j), kind, r, cov) for (i, j), r in zip(pairs, rel)]
    return edges


def as_tracks(sequences: Iterable[bags.Sequence | bags.Track]) -> list[bags.Track]:
    """Sequences (frames with images) or Tracks (poses alone) -> Tracks."""
    return [s.track() if hasattr(s, 'track') else s for s in sequences]


def derive_edges(sequences: Iterable[bags.Sequence | bags.Track], adjacent_k: int = 3, distant_radius_m: float = 1.0,
                 distant_angle_deg: float = 30.0, distant_min_gap_frames: int = 30,
                 max_distant_per_frame: int = 8, seed: int = 0) -> list[Edge]:
    """Adjacent and distant edges from the frames' T_map_cam (see derive_edges_from_poses); poses alone
    (Tracks) suffice."""
    tracks = as_tracks(sequences)
    T = np.concatenate([t.T_map_cam for t in tracks]) if tracks else np.zeros((0, 4, 4))
    seq = np.concatenate([np.full(len(t.stamps_ns), t.seq, np.int64) for t in tracks]) if tracks else \
        np.zeros(0, np.int64)
    return derive_edges_from_poses(T, seq, adjacent_k, distant_radius_m, distant_angle_deg,
                                   distant_min_gap_frames, max_distant_per_frame, seed)


def edges_from_bags(sequences: Iterable[bags.Sequence | bags.Track]) -> list[Edge] | None:
    """Explicit edges from the bags' graph topic, matched to frames by (sequence id, image stamp).

    The sequence id is the one the recorder wrote (a bag's own edges start in its sequence), not the
    bag's position in `sequences`, so any subset of a scene's bags, in any order, matches correctly.

    None when no bag has the graph topic. Edges whose frames were not read (dropped, other sequences not
    loaded, max_frames) are left out; so are duplicates (the same (i, j, kind) written twice).
    """
    tracks = as_tracks(sequences)
    if all(s.edges is None for s in tracks):
        return None
    index, g = {}, 0
    for s in tracks:
        own = [e.seq_i for e in s.edges or ()]
        recorded_id = max(set(own), key=own.count) if own else s.seq
        for stamp in s.stamps_ns.tolist():
            index[(recorded_id, stamp)] = g
            g += 1
    out, seen = [], set()
    for s in tracks:
        for e in s.edges or ():
            i, j = index.get((e.seq_i, e.stamp_i_ns)), index.get((e.seq_j, e.stamp_j_ns))
            if i is None or j is None or (i, j, e.kind) in seen:
                continue
            seen.add((i, j, e.kind))
            out.append(Edge(i, j, e.kind, e.T_i_j, e.covariance))
    return out


def scene_edges(sequences: Iterable[bags.Sequence | bags.Track]) -> tuple[list[Edge], str]:
    """The scene's relative-pose graph and where it came from: the bags' explicit edges ('explicit') if any bag
    has the graph topic, else edges derived from the poses ('derived')."""
    explicit = edges_from_bags(sequences)
    if explicit is not None:
        return explicit, 'explicit'
    return derive_edges(sequences), 'derived'


def edge_counts(edges: list[Edge]) -> dict[str, int]:
    """{'adjacent': n, 'distant': m}."""
    counts = {name: 0 for name in KIND_NAMES.values()}
    for e in edges:
        name = KIND_NAMES.get(e.kind, f'kind {e.kind}')
        counts[name] = counts.get(name, 0) + 1
    return counts
