"""globloc.synth: determinism, scene layout, lighting, paths and the written contract."""
from __future__ import annotations

import json

import numpy as np
import pytest

from globloc import bags, cli, synth


@pytest.fixture(scope='module')
def tiny(tiny_scene):
    return bags.read_bags([tiny_scene], progress=False)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_same_arguments_same_bytes(tmp_path):
    args = dict(seed=5, frames=4, sequences=2, size=(48, 36), progress=False)
    synth.generate(tmp_path / 'a', **args)
    synth.generate(tmp_path / 'b', **args)
    a, b = files_of(tmp_path / 'a'), files_of(tmp_path / 'b')
    assert sorted(a) == ['scene.json', 'seq_00/metadata.yaml', 'seq_00/seq_00.mcap', 'seq_01/metadata.yaml',
                         'seq_01/seq_01.mcap']
    assert a == b
    synth.generate(tmp_path / 'c', **{**args, 'seed': 6})
    assert files_of(tmp_path / 'c')['seq_00/seq_00.mcap'] != a['seq_00/seq_00.mcap']


def test_scene_json_and_contract(tiny_scene, tiny):
    scene = json.loads((tiny_scene / 'scene.json').read_text())
    assert scene['held_out'] == 'seq_02' and scene['train'] == ['seq_00', 'seq_01']
    assert scene['changed_lighting'] == 'seq_01'
    K = np.array(scene['K'])
    assert K[0, 0] == K[1, 1] == pytest.approx(0.8 * 160) and K[0, 2] == 79.5 and K[1, 2] == 59.5
    for s in tiny:
        assert set(s.report.counts) == {'/camera/image_raw', '/camera/camera_info', '/camera/depth/image_raw',
                                        '/globloc/gt_pose', '/globloc/landmarks', '/globloc/pose_graph'}
        stamps = np.array([f.stamp_ns for f in s.frames])
        assert np.all(np.diff(stamps) == 100_000_000)  # 10 Hz
        for f in s.frames:
            assert len(f.landmarks) == round(0.005 * 160 * 120)
            assert np.all(np.isfinite(f.depth))  # a closed room: every ray hits something
    # Sequences have disjoint stamps, so (seq, stamp) and even the stamp alone name one frame.
    all_stamps = [f.stamp_ns for s in tiny for f in s.frames]
    assert len(set(all_stamps)) == len(all_stamps)


def test_changed_lighting_is_darker_and_tinted(tiny):
    mean = [np.mean([f.image.reshape(-1, 3).mean(0) for f in s.frames], axis=0) for s in tiny]
    assert mean[1].sum() < 0.7 * mean[0].sum() and mean[1].sum() < 0.7 * mean[2].sum()
    assert mean[1][2] / mean[1][0] < 0.8 * mean[0][2] / mean[0][0]  # warmer: less blue relative to red


def test_cameras_inside_room_at_sane_distances(tiny):
    room_min, room_max = synth.ROOM_MIN, synth.ROOM_MAX
    for s in tiny:
        c = np.array([f.T_map_cam[:3, 3] for f in s.frames])
        assert np.all(c > room_min + 1.0) and np.all(c < room_max - 1.0)
        depth = np.median([np.nanmedian(f.depth) for f in s.frames])
        assert 1.5 < depth < 4.0
        # Smooth: consecutive frames (10 Hz, 24 frames per loop here) are close in position and heading.
        steps = np.linalg.norm(np.diff(c, axis=0), axis=1)
        assert steps.max() < 0.5


def test_held_out_path_passes_through_training_region(tiny):
    train = np.array([f.T_map_cam for s in tiny[:-1] for f in s.frames])
    for f in tiny[-1].frames:
        d = np.linalg.norm(train[:, :3, 3] - f.T_map_cam[:3, 3], axis=1)
        angle = np.degrees(np.arccos(np.clip(train[:, :3, 2] @ f.T_map_cam[:3, 2], -1, 1)))
        assert np.min(np.where(angle < 30, d, np.inf)) < 0.6


def test_surfaces_are_textured_not_flat(tiny):
    img = tiny[0].frames[0].image.astype(np.float32)
    gx = np.abs(np.diff(img, axis=1)).mean()
    assert gx > 3.0  # photographs, not flat colours
    images = {s.frames[0].image.tobytes() for s in tiny}
    assert len(images) == 3


def test_bad_arguments(tmp_path, tiny_scene):
    with pytest.raises(ValueError, match='at least 2 sequences'):
        synth.generate(tmp_path / 'x', sequences=1, frames=2, size=(32, 24), progress=False)
    with pytest.raises(ValueError, match='label_fraction'):
        synth.generate(tmp_path / 'y', label_fraction=0.0, frames=2, size=(32, 24), progress=False)
    with pytest.raises(ValueError, match='already holds seq_00'):
        synth.generate(tiny_scene, frames=2, size=(32, 24), progress=False)


def test_cli_synth(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(['synth', '--out', str(tmp_path / 's'), '--frames', '3', '--size', '40x30', '--seed', '1',
                  '--label-fraction', '0.01'])
    assert e.value.code == 0
    assert 'held out: seq_02' in capsys.readouterr().out
    seqs = bags.read_bags([tmp_path / 's'], label_fraction=0.01, progress=False)
    assert [len(s.frames) for s in seqs] == [3, 3, 3]
    assert seqs[0].frames[0].image.shape == (30, 40, 3) and len(seqs[0].frames[0].landmarks) == 12


def test_detour_leaves_the_training_paths_for_a_stretch(tmp_path):
    """--detour 0.5,50: in the middle of the held-out loop the cameras are decimetres and tens of degrees from
    every training camera (the views a one-shot network has not seen), elsewhere the loop is unchanged."""
    args = dict(seed=0, frames=60, sequences=3, size=(48, 36), progress=False)
    scene = synth.generate(tmp_path / 'hard', detour_m_deg=(0.5, 50.0), **args)
    assert scene['held_out_detour'] == {'metres': 0.5, 'degrees': 50.0, 'stretch': list(synth.DETOUR_STRETCH)}
    synth.generate(tmp_path / 'plain', **args)
    plain, hard = (bags.read_bags([tmp_path / name], progress=False) for name in ('plain', 'hard'))
    train = np.array([f.T_map_cam for s in hard[:-1] for f in s.frames])
    moved = []
    for a, b in zip(plain[-1].frames, hard[-1].frames):
        d = np.linalg.norm(train[:, :3, 3] - b.T_map_cam[:3, 3], axis=1)
        angle = np.degrees(np.arccos(np.clip(train[:, :3, 2] @ b.T_map_cam[:3, 2], -1, 1)))
        x = b.index / 60
        if synth.DETOUR_STRETCH[0] + 0.1 < x < synth.DETOUR_STRETCH[1] - 0.1:  # the middle of the stretch
            moved.append((d.min(), angle[np.argmin(d)]))
        elif not synth.DETOUR_STRETCH[0] < x < synth.DETOUR_STRETCH[1]:
            assert np.array_equal(a.T_map_cam, b.T_map_cam) and np.array_equal(a.image, b.image)
    moved = np.array(moved)
    assert len(moved) >= 8 and np.median(moved[:, 0]) > 0.35 and np.median(moved[:, 1]) > 25, moved
    with pytest.raises(SystemExit):
        cli.main(['synth', '--out', str(tmp_path / 'x'), '--detour', '0.5'])
