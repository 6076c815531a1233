"""globloc.bags: round trips, an independent reader, geometry of the labels, the real bags, broken input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin

from globloc import bags, synth
from globloc.bags import BagError, Frame, Topics
from globloc_ros import frames as fr

STAMP0 = 1_700_000_000 * 10**9


def make_frames(n=5, size=(64, 48), nan_depth=True) -> list[Frame]:
    """Rendered frames held in memory (the ground truth a round trip must reproduce)."""
    renderer = synth.Renderer(*size)
    poses = synth.path_poses(synth.sequence_paths(2, np.random.default_rng(3))[0], 40)[::8][:n]
    out = []
    for k, T in enumerate(poses):
        image, depth = renderer.render(T, synth.NORMAL_LIGHT)
        if nan_depth:
            depth[k, :5] = np.nan
        labels = bags.labels_from_depth(depth, renderer.K, T, 0.01, np.random.default_rng(k))
        out.append(Frame(seq=0, index=k, stamp_ns=STAMP0 + k * 100_000_000 + 7, image=image,
                         K=renderer.K.copy(), T_map_cam=T, depth=depth, landmarks=labels, frame_id='cam_opt'))
    return out


def rewrite(src: Path, dst: Path, edit=None, storage=StoragePlugin.MCAP) -> Path:
    """Copy bag src to dst, message by message; edit(topic, msg, stamp_ns) -> msg, or None to drop it."""
    store = bags.typestore()
    writer = Writer(dst, version=9, storage_plugin=storage)
    if storage == StoragePlugin.MCAP:
        writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    writer.open()
    conns = {}
    with Reader(src) as reader:
        for conn, t, raw in reader.messages():
            msg = store.deserialize_cdr(raw, conn.msgtype)
            msgtype = conn.msgtype
            if edit is not None:
                msg = edit(conn.topic, msg, t)
                if msg is None:
                    continue
                msgtype = msg.__msgtype__
            if conn.topic not in conns:
                conns[conn.topic] = writer.add_connection(conn.topic, msgtype, typestore=store)
            writer.write(conns[conn.topic], t, store.serialize_cdr(msg, msgtype))
    writer.close()
    return dst


def seq0(tiny_scene: Path) -> Path:
    return tiny_scene / 'seq_00'


def first_stamp(path: Path) -> str:
    return bags._fmt_stamp(bags.read_sequence(path, progress=False).frames[0].stamp_ns)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize('compressed', [False, 'png'])
def test_round_trip_exact(tmp_path, compressed):
    frames = make_frames()
    bags.write_sequence(tmp_path / 'bag', frames, compressed=compressed)
    seq = bags.read_sequence(tmp_path / 'bag', label_fraction=0.01, progress=False)
    assert len(seq.frames) == len(frames) and seq.report.matched == len(frames)
    assert seq.report.labels == 'landmarks'
    for a, b in zip(frames, seq.frames):
        assert b.stamp_ns == a.stamp_ns and b.frame_id == 'cam_opt' and b.index == a.index
        np.testing.assert_array_equal(b.image, a.image)
        np.testing.assert_array_equal(b.K, a.K)
        np.testing.assert_allclose(b.T_map_cam, a.T_map_cam, atol=1e-9, rtol=0)
        assert b.depth.dtype == np.float32
        np.testing.assert_array_equal(b.depth, a.depth)  # NaN positions included
        np.testing.assert_array_equal(b.landmarks, a.landmarks)


def test_round_trip_depth_mm_odometry_latched_info(tmp_path):
    frames = make_frames(3)
    topics = Topics(odometry='/odom', image='/cam/raw')
    bags.write_sequence(tmp_path / 'bag', frames, topics=topics, camera_info_once=True, depth_encoding='16UC1')
    seq = bags.read_sequence(tmp_path / 'bag', topics=topics, label_fraction=0.01, progress=False)
    assert seq.report.counts['/camera/camera_info'] == 1 and seq.report.counts['/odom'] == 3
    assert len(seq.frames) == 3
    for a, b in zip(frames, seq.frames):
        np.testing.assert_allclose(b.T_map_cam, a.T_map_cam, atol=1e-9, rtol=0)
        np.testing.assert_array_equal(b.K, a.K)
        valid = np.isfinite(a.depth)
        np.testing.assert_array_equal(np.isfinite(b.depth), valid)
        assert np.abs(b.depth[valid] - a.depth[valid]).max() <= 0.0005 + 1e-6  # millimetre rounding


def test_sqlite3_bag_reads_the_same(tiny_scene, tmp_path):
    db3 = rewrite(seq0(tiny_scene), tmp_path / 'sql', storage=StoragePlugin.SQLITE3)
    assert (db3 / 'sql.db3').exists()
    a = bags.read_sequence(seq0(tiny_scene), progress=False)
    for path in (db3, db3 / 'sql.db3'):
        b = bags.read_sequence(path, progress=False)
        assert len(b.frames) == 24 and len(b.edges) == len(a.edges)
        for fa, fb in zip(a.frames, b.frames):
            np.testing.assert_array_equal(fa.image, fb.image)
            np.testing.assert_array_equal(fa.depth, fb.depth)
            np.testing.assert_array_equal(fa.T_map_cam, fb.T_map_cam)


def test_tiny_scene_poses_are_the_generated_ones(tiny_scene):
    scene = json.loads((tiny_scene / 'scene.json').read_text())
    seqs = bags.read_bags([tiny_scene], progress=False)
    assert [s.path.name for s in seqs] == scene['sequences'] == ['seq_00', 'seq_01', 'seq_02']
    paths = synth.sequence_paths(3, np.random.default_rng(scene['seed']))
    for s, p in zip(seqs, paths):
        assert s.seq == int(s.path.name[-2:])
        T = np.stack([f.T_map_cam for f in s.frames])
        np.testing.assert_allclose(T, synth.path_poses(p, scene['frames_per_sequence']), atol=1e-9, rtol=0)
        np.testing.assert_array_equal(s.frames[0].K, np.array(scene['K']))


def test_independent_mcap_reader_agrees(tiny_scene):
    """mcap + mcap_ros2 share no code with rosbags: same pose values and image bytes."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    seq = bags.read_sequence(seq0(tiny_scene), progress=False)
    by_stamp = {f.stamp_ns: f for f in seq.frames}
    seen = {'/camera/image_raw': 0, '/globloc/gt_pose': 0}
    with open(seq0(tiny_scene) / 'seq_00.mcap', 'rb') as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        for _, channel, message, msg in reader.iter_decoded_messages(topics=list(seen)):
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            assert stamp == message.log_time
            f = by_stamp[stamp]
            if channel.topic == '/camera/image_raw':
                assert msg.encoding == 'rgb8' and (msg.width, msg.height) == (160, 120)
                assert bytes(msg.data) == f.image.tobytes()
            else:
                p, q = msg.pose.position, msg.pose.orientation
                T = fr.pose_from_xyz_quat([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])
                np.testing.assert_allclose(T, f.T_map_cam, atol=1e-12, rtol=0)
                assert msg.header.frame_id == 'map'
            seen[channel.topic] += 1
    assert seen == {'/camera/image_raw': 24, '/globloc/gt_pose': 24}


# ---------------------------------------------------------------------------------------------- geometry
def reprojection_dz(frames, gap, invert=False):
    """|z_projected - depth| (m) of frame i's landmarks seen in frame i+gap, occluded points left out."""
    errs = []
    for a, b in zip(frames[:-gap], frames[gap:]):
        T = fr.invert_pose(b.T_map_cam)
        if invert:
            T = b.T_map_cam
        X = a.landmarks[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
        uv, z = fr.project(X, b.K)
        h, w = b.depth.shape
        ui, vi = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
        ok = (z > 0) & (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
        d = b.depth[vi[ok], ui[ok]]
        dz = z[ok] - d
        visible = np.isfinite(d) & (dz < 0.05)  # further than the surface by > 5 cm: hidden behind it
        errs.append(np.abs(dz[visible]))
    return np.concatenate(errs)


def test_landmarks_reproject_onto_depth_of_later_frame(tiny_scene):
    frames = bags.read_sequence(seq0(tiny_scene), progress=False).frames
    err = reprojection_dz(frames, gap=2)
    assert err.size > 500
    assert np.median(err) < 0.01
    # The same check with the pose convention inverted fails: the test can tell.
    wrong = reprojection_dz(frames, gap=2, invert=True)
    assert wrong.size < 50 or np.median(wrong) > 0.05


def test_depth_labels_and_resize(tiny_scene):
    full = bags.read_sequence(seq0(tiny_scene), progress=False, max_frames=4)
    small = bags.read_sequence(seq0(tiny_scene), progress=False, max_frames=4, size=(80, 60))
    for a, b in zip(full.frames, small.frames):
        assert b.image.shape == (60, 80, 3) and b.depth.shape == (60, 80)
        np.testing.assert_allclose(b.K, fr.scale_intrinsics(a.K, 0.5, 0.5))
        # Nearest with the pixel-centre rule: small pixel (i, j) is big pixel (2i+1, 2j+1) (the
        # exact-nearest rounding picks the later of the two equidistant source pixels).
        np.testing.assert_array_equal(b.depth, a.depth[1::2, 1::2])
        # Labels keep their 3D points; their pixels follow the pixel-centre rule, so they still project.
        X = b.landmarks[:, :3].astype(np.float64)
        T = fr.invert_pose(b.T_map_cam)
        uv, _ = fr.project(X @ T[:3, :3].T + T[:3, 3], b.K)
        np.testing.assert_allclose(uv, b.landmarks[:, 3:], atol=2e-3)
        assert len(b.landmarks) == bags.label_count(0.005, 80, 60) == 24


# ---------------------------------------------------------------------------------------------- labels
def test_label_fraction_deterministic_and_counted(tiny_scene, tmp_path):
    no_lm = rewrite(seq0(tiny_scene), tmp_path / 'nolm', lambda t, m, s: None if t == '/globloc/landmarks' else m)
    a = bags.read_sequence(no_lm, label_fraction=0.01, seed=1, progress=False)
    b = bags.read_sequence(no_lm, label_fraction=0.01, seed=1, progress=False)
    c = bags.read_sequence(no_lm, label_fraction=0.01, seed=2, progress=False)
    assert a.report.labels == 'depth'
    for fa, fb, fc in zip(a.frames, b.frames, c.frames):
        assert fa.landmarks.shape == (round(0.01 * 160 * 120), 5)
        np.testing.assert_array_equal(fa.landmarks, fb.landmarks)
        assert not np.array_equal(fa.landmarks, fc.landmarks)
        # Drawn from depth: each label's camera-frame z is the depth at its pixel.
        X = fa.landmarks[:, :3].astype(np.float64)
        T = fr.invert_pose(fa.T_map_cam)
        z = (X @ T[:3, :3].T + T[:3, 3])[:, 2]
        u, v = fa.landmarks[:, 3].astype(int), fa.landmarks[:, 4].astype(int)
        np.testing.assert_allclose(z, fa.depth[v, u], atol=1e-5)
    # Stored landmarks are subsampled, not replaced, at a lower fraction.
    full = bags.read_sequence(seq0(tiny_scene), progress=False).frames[0].landmarks
    sub = bags.read_sequence(seq0(tiny_scene), label_fraction=0.002, progress=False).frames[0].landmarks
    assert sub.shape[0] == round(0.002 * 160 * 120)
    assert {tuple(r) for r in sub.tolist()} <= {tuple(r) for r in full.tolist()}


@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5, float('nan')])
def test_invalid_label_fraction(tiny_scene, fraction):
    with pytest.raises(ValueError, match='label_fraction'):
        bags.read_sequence(seq0(tiny_scene), label_fraction=fraction, progress=False)


# ---------------------------------------------------------------------------------------------- matching
def test_unmatched_frames_are_counted_not_guessed(tiny_scene, tmp_path):
    stamps = [f.stamp_ns for f in bags.read_sequence(seq0(tiny_scene), progress=False).frames]
    drop = set(stamps[3:6])

    def edit(topic, msg, t):
        if topic == '/globloc/gt_pose' and t in drop:
            return None
        if topic == '/camera/depth/image_raw':
            s = t + (500_000 if t == stamps[10] else 2_000_000 if t == stamps[11] else 0)
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(s, 10**9)
        return msg

    seq = bags.read_sequence(rewrite(seq0(tiny_scene), tmp_path / 'b', edit), progress=False)
    assert len(seq.frames) == 21
    assert seq.report.unmatched == {'no /globloc/gt_pose within 1 ms': 3}
    assert seq.report.missing == {'/camera/depth/image_raw': 1}  # 0.5 ms off still matches, 2 ms does not
    by_stamp = {f.stamp_ns: f for f in seq.frames}
    assert by_stamp[stamps[10]].depth is not None and by_stamp[stamps[11]].depth is None
    assert not drop & set(by_stamp)


def test_read_bags_expands_folders_in_order(tiny_scene):
    paths = bags.bag_paths([tiny_scene])
    assert [p.name for p in paths] == ['seq_00', 'seq_01', 'seq_02']
    seqs = bags.read_bags([tiny_scene / 'seq_01' / 'seq_01.mcap', tiny_scene / 'seq_00'], progress=False,
                          max_frames=2)
    assert [s.seq for s in seqs] == [0, 1] and [len(s.frames) for s in seqs] == [2, 2]
    assert all(f.seq == s.seq for s in seqs for f in s.frames)


def test_info_command(tiny_scene, capsys):
    from globloc import cli

    with pytest.raises(SystemExit) as e:
        cli.main(['info', str(tiny_scene)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'edges (explicit): adjacent 198' in out
    assert out.count('  24 frames over') == 3 and 'labels: landmarks, fraction 0.0050' in out


# ---------------------------------------------------------------------------------------------- real bags
REAL_COUNTS = {'strecha_castle_p19': 19, 'strecha_entry_p10': 10, 'strecha_fountain_p11': 11,
               'sun3d_frag1': 50, 'sun3d_frag2': 50}


def test_real_bags_read(real_bags):
    seqs = bags.read_bags([real_bags], progress=False)
    assert {s.path.name: len(s.frames) for s in seqs} == REAL_COUNTS
    for s in seqs:
        assert s.edges is None and not s.report.corrupt and not s.report.unmatched
        assert s.report.labels == 'landmarks'
        for f in s.frames:
            assert f.image.dtype == np.uint8 and f.image.shape[2] == 3
            assert np.allclose(f.T_map_cam[:3, :3] @ f.T_map_cam[:3, :3].T, np.eye(3), atol=1e-6)
            assert f.landmarks is not None and len(f.landmarks) > 100
            if s.path.name.startswith('sun3d'):
                assert f.depth.shape == (480, 640)
                assert 0.3 < np.nanmedian(f.depth) < 10.0 and np.nanmin(f.depth) > 0
            else:
                assert f.depth is None


@pytest.mark.parametrize('size', [None, (384, 256)])
def test_real_landmarks_project_onto_their_pixels(real_bags, size):
    seq = bags.read_sequence(real_bags / 'strecha_fountain_p11', size=size, label_fraction=0.01, progress=False)
    errs = []
    for f in seq.frames:
        T = fr.invert_pose(f.T_map_cam)
        uv, z = fr.project(f.landmarks[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3], f.K)
        assert np.all(z > 0)
        errs.append(np.linalg.norm(uv - f.landmarks[:, 3:], axis=1))
    assert np.median(np.concatenate(errs)) < (2.0 if size is None else 1.0)


def _cut_in_half(bag: Path, dst: Path, name: str) -> tuple[Path, bytes]:
    """Copy the bag folder to dst and cut its storage file `name` in half; returns (file, original bytes)."""
    shutil.copytree(bag, dst)
    mcap = dst / name
    data = mcap.read_bytes()
    mcap.write_bytes(data[:len(data) // 2])
    return mcap, data


def test_truncated_real_bag_keeps_what_it_can(real_bags, tmp_path):
    dst = tmp_path / 'sun3d_frag1'
    _cut_in_half(real_bags / 'sun3d_frag1', dst, 'sun3d_frag1.mcap')
    with pytest.warns(UserWarning, match='sun3d_frag1.mcap'):
        seq = bags.read_sequence(dst, progress=False)
    assert seq.report.truncated and 5 < len(seq.frames) < 50
    assert any('sun3d_frag1.mcap' in w and 'ends early' in w for w in seq.report.warnings)
    full = bags.read_sequence(real_bags / 'sun3d_frag1', progress=False, max_frames=len(seq.frames))
    for a, b in zip(full.frames, seq.frames):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.T_map_cam, b.T_map_cam)


# ---------------------------------------------------------------------------------------------- broken input
def test_missing_file(tmp_path):
    with pytest.raises(BagError, match=r'nope.*does not exist'):
        bags.read_sequence(tmp_path / 'nope', progress=False)
    with pytest.raises(BagError, match=r'nope.*does not exist'):
        bags.read_bags([tmp_path / 'nope'], progress=False)


@pytest.mark.parametrize('name,content', [('random.mcap', None), ('notes.txt', b'hello, not a bag\n'),
                                          ('random.db3', None)])
def test_not_a_bag(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if content is not None else np.random.default_rng(0).bytes(5000))
    with pytest.raises(BagError, match=rf'{name}.*not a rosbag2 bag'):
        bags.read_sequence(path, progress=False)


def test_folder_without_bag(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(BagError, match='empty.*not a rosbag2 bag'):
        bags.read_sequence(tmp_path / 'empty', progress=False)


def test_truncated_synthetic_bag(tiny_scene, tmp_path):
    dst = tmp_path / 'cut'
    mcap, data = _cut_in_half(seq0(tiny_scene), dst, 'seq_00.mcap')
    with pytest.warns(UserWarning, match='ends early'):
        seq = bags.read_sequence(dst, progress=False)
    assert seq.report.truncated and 0 < len(seq.frames) < 24
    mcap.write_bytes(data[:200])  # cut inside the first chunk: nothing readable, a clear error
    with pytest.raises(BagError, match=r'cut: no image topic .* topics present: none .*seq_00.mcap: storage ends '
                                       r'early'):
        bags.read_sequence(dst, progress=False)


def test_corrupt_compressed_image_is_skipped(tiny_scene, tmp_path):
    frames = bags.read_sequence(seq0(tiny_scene), progress=False, max_frames=6).frames
    bags.write_sequence(tmp_path / 'jpeg', frames, compressed='jpeg')
    bad = frames[2].stamp_ns

    def edit(topic, msg, t):
        if topic == '/camera/image_raw/compressed' and t == bad:
            msg.data = np.frombuffer(np.random.default_rng(0).bytes(msg.data.size), dtype=np.uint8)
        return msg

    with pytest.warns(UserWarning, match='not a decodable jpeg'):
        seq = bags.read_sequence(rewrite(tmp_path / 'jpeg', tmp_path / 'bad', edit), progress=False)
    assert [f.stamp_ns for f in seq.frames] == [f.stamp_ns for i, f in enumerate(frames) if i != 2]
    assert len(seq.report.corrupt) == 1
    msg = seq.report.corrupt[0]
    assert 'bad' in msg and '/camera/image_raw/compressed' in msg and bags._fmt_stamp(bad) in msg
    assert np.abs(seq.frames[0].image.astype(int) - frames[0].image).mean() < 8  # the others decode (jpeg)


def test_missing_pose_topic_lists_topics(tiny_scene, tmp_path):
    path = rewrite(seq0(tiny_scene), tmp_path / 'nopose', lambda t, m, s: None if t == '/globloc/gt_pose' else m)
    with pytest.raises(BagError) as e:
        bags.read_sequence(path, progress=False)
    text = str(e.value)
    assert 'nopose' in text and "'/globloc/gt_pose' not in bag" in text
    assert '/camera/image_raw (sensor_msgs/msg/Image)' in text and '/globloc/landmarks' in text
    with pytest.raises(BagError, match="odometry topic '/odom' not in bag"):
        bags.read_sequence(seq0(tiny_scene), topics=Topics(odometry='/odom'), progress=False)


def broken(tiny_scene, tmp_path, topic, change):
    """seq_00 with `change(msg)` applied to the messages of `topic` at the 5th frame's stamp."""
    stamp = bags.read_sequence(seq0(tiny_scene), progress=False).frames[4].stamp_ns

    def edit(t, msg, s):
        if t == topic and s == stamp:
            change(msg)
        return msg
    return rewrite(seq0(tiny_scene), tmp_path / 'broken', edit), bags._fmt_stamp(stamp)


def test_unsupported_and_corrupt_frames_are_skipped_and_the_rest_read(tiny_scene, tmp_path):
    """One bad frame never ends reading a training bag: it is reported (file, topic, stamp, why) and skipped."""
    good = bags.read_sequence(seq0(tiny_scene), progress=False)
    stamps = [f.stamp_ns for f in good.frames]
    bad = {stamps[2]: ('/camera/image_raw', 'nv21'), stamps[5]: ('/camera/image_raw', 'truncated'),
           stamps[9]: ('/camera/depth/image_raw', '8UC1')}

    def edit(topic, msg, t):
        if t in bad and topic == bad[t][0]:
            if bad[t][1] == 'truncated':
                msg.data = msg.data[:-7]
            else:
                msg.encoding = bad[t][1]
        return msg

    with pytest.warns(UserWarning, match=r'bad: /camera/(image_raw|depth/image_raw) at stamp'):
        seq = bags.read_sequence(rewrite(seq0(tiny_scene), tmp_path / 'bad', edit), progress=False)
    assert [f.stamp_ns for f in seq.frames] == [s for s in stamps if s not in bad]
    assert len(seq.report.corrupt) == 3
    for line, (stamp, (topic, why)) in zip(seq.report.corrupt, sorted(bad.items())):
        assert f'bad: {topic} at stamp {bags._fmt_stamp(stamp)}: ' in line and '\n' not in line
    assert "Image.encoding 'nv21' is not supported" in seq.report.corrupt[0]
    assert 'Image.data has' in seq.report.corrupt[1]
    assert "Image.encoding '8UC1' is not a depth encoding" in seq.report.corrupt[2]
    np.testing.assert_array_equal(seq.frames[3].image, good.frames[4].image)


def test_every_frame_unsupported_is_a_clear_error(tiny_scene, tmp_path):
    path = rewrite(seq0(tiny_scene), tmp_path / 'nv21',
                   lambda t, m, s: _set(m, encoding='nv21') if t == '/camera/image_raw' else m)
    with pytest.warns(UserWarning), pytest.raises(BagError, match=r"nv21: no readable frames .*Image\.encoding 'nv21'"):
        bags.read_sequence(path, progress=False)


def _set(msg, **fields):
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg


def _reencode(msg, encoding: str, pad: int = 0, bigendian: int = 0):
    """An rgb8 rosbags Image re-encoded without loss as bgra8, rgba8, 8UC3 or bgr16, rows padded by `pad`."""
    h, w = msg.height, msg.width
    rgb = np.asarray(msg.data, np.uint8).reshape(h, w, 3)
    alpha = np.full((h, w, 1), 255, np.uint8)
    pixels = {'bgra8': np.concatenate([rgb[:, :, ::-1], alpha], 2), 'rgba8': np.concatenate([rgb, alpha], 2),
              '8UC3': rgb[:, :, ::-1], 'bgr16': rgb[:, :, ::-1].astype(np.uint16) * 257}[encoding]
    rows = pixels.astype(pixels.dtype.newbyteorder('>' if bigendian else '<')).reshape(h, -1).view(np.uint8)
    rows = np.hstack([rows, np.zeros((h, pad), np.uint8)])
    return _set(msg, encoding=encoding, step=rows.shape[1], is_bigendian=bigendian, data=rows.reshape(-1))


def test_cv_bridge_encodings_read_like_rgb8(tiny_scene, tmp_path):
    """The bag reader decodes with the node's conversion: lossless re-encodings give the same frames."""
    good = bags.read_sequence(seq0(tiny_scene), progress=False, max_frames=8)
    forms = [('bgra8', 0, 0), ('rgba8', 3, 0), ('8UC3', 0, 0), ('bgr16', 4, 1), ('bgr16', 0, 0)]
    stamps = {f.stamp_ns: forms[i % len(forms)] for i, f in enumerate(good.frames)}

    def edit(topic, msg, t):
        return _reencode(msg, *stamps[t]) if topic == '/camera/image_raw' and t in stamps else msg

    seq = bags.read_sequence(rewrite(seq0(tiny_scene), tmp_path / 'enc', edit), progress=False, max_frames=8)
    assert not seq.report.corrupt and len(seq.frames) == 8
    for a, b in zip(good.frames, seq.frames):
        np.testing.assert_array_equal(b.image, a.image)
        assert b.image.flags.writeable and b.image.flags.c_contiguous


def test_compressed_depth_topic(tmp_path):
    """Depth recorded through compressed_depth_image_transport (16UC1 png after its 12-byte header) reads as mm."""
    import cv2

    frames = make_frames(3)
    bags.write_sequence(tmp_path / 'raw', frames, depth_encoding='16UC1')
    CompressedImage = bags.typestore().types['sensor_msgs/msg/CompressedImage']

    def edit(topic, msg, t):
        if topic != '/camera/depth/image_raw':
            return msg
        mm = np.asarray(msg.data, np.uint8).view('<u2').reshape(msg.height, msg.width)
        data = bytes(12) + cv2.imencode('.png', mm)[1].tobytes()
        return CompressedImage(header=msg.header, format='16UC1; compressedDepth png',
                               data=np.frombuffer(data, np.uint8))

    seq = bags.read_sequence(rewrite(tmp_path / 'raw', tmp_path / 'cd', edit), label_fraction=0.01, progress=False)
    assert not seq.report.corrupt and len(seq.frames) == 3
    for a, b in zip(frames, seq.frames):
        valid = np.isfinite(a.depth)
        np.testing.assert_array_equal(np.isfinite(b.depth), valid)
        assert np.abs(b.depth[valid] - a.depth[valid]).max() <= 0.0005 + 1e-6  # millimetre rounding


def test_image_size_disagrees_with_camera_info(tiny_scene, tmp_path):
    path, stamp = broken(tiny_scene, tmp_path, '/camera/camera_info', lambda m: setattr(m, 'width', 320))
    with pytest.raises(BagError, match=rf'broken: /camera/camera_info for image stamp {stamp}: image is 160x120 '
                                       rf'but its CameraInfo says 320x120'):
        bags.read_sequence(path, progress=False)


def test_distortion_is_rejected(tiny_scene, tmp_path):
    def distort(m):
        m.d = np.array([0.1, -0.02, 0.0, 0.0, 0.0])
    path, stamp = broken(tiny_scene, tmp_path, '/camera/camera_info', distort)
    with pytest.raises(BagError, match=rf'{stamp}: CameraInfo has non-zero distortion d=\[0.1, -0.02'):
        bags.read_sequence(path, progress=False)


@pytest.mark.parametrize('w,why', [(2.0, 'is not unit'), (float('nan'), 'must be 4 finite numbers')])
def test_bad_quaternion_skips_frame(tiny_scene, tmp_path, w, why):
    path, stamp = broken(tiny_scene, tmp_path, '/globloc/gt_pose', lambda m: setattr(m.pose.orientation, 'w', w))
    with pytest.warns(UserWarning, match=why):
        seq = bags.read_sequence(path, progress=False)
    assert len(seq.frames) == 23 and len(seq.report.corrupt) == 1
    assert f'broken: /globloc/gt_pose at stamp {stamp}' in seq.report.corrupt[0]


def test_decode_depth_big_endian_millimetres():
    from types import SimpleNamespace as Msg

    depth = Msg(encoding='16UC1', height=1, width=3, step=6, is_bigendian=1,
                data=np.array([0, 1500, 65535], dtype='>u2').tobytes())
    np.testing.assert_array_equal(bags.decode_depth(depth, 'x'), np.array([[np.nan, 1.5, 65.535]], np.float32))
    padded = Msg(encoding='32FC1', height=2, width=1, step=8, is_bigendian=0,
                 data=np.array([[2.5, 9.0], [np.inf, 9.0]], dtype='<f4').tobytes())
    np.testing.assert_array_equal(bags.decode_depth(padded, 'x'), np.array([[2.5], [np.nan]], np.float32))


def test_renamed_topics_from_the_command_line(tiny_scene, tmp_path):
    """A bag recorded with other topic names trains once --topic says which ones."""
    from globloc import dataset

    frames = bags.read_sequence(tiny_scene / 'seq_00', progress=False, max_frames=4).frames
    bags.write_sequence(tmp_path / 'renamed', frames, topics=bags.Topics(pose='/slam/camera_pose'))
    with pytest.raises(bags.BagError, match="'/globloc/gt_pose' not in bag"):
        dataset.load_sequences([tmp_path / 'renamed'], 0.005)
    topics = bags.parse_topics(['pose=/slam/camera_pose'])
    seqs = dataset.load_sequences([tmp_path / 'renamed'], 0.005, topics=topics)
    assert len(seqs[0].frames) == 4
    np.testing.assert_allclose(seqs[0].frames[3].T_map_cam, frames[3].T_map_cam, atol=1e-12)
    for bad in (['pose'], ['posse=/x'], ['pose=relative']):
        with pytest.raises(ValueError, match='--topic'):
            bags.parse_topics(bad)


# ---------------------------------------------------------------------------------------------- streaming
def relog(src: Path, dst: Path, shift) -> Path:
    """Copy bag src to dst with each message's log time moved by shift(topic, header stamp ns) ns (None: dropped);
    header stamps stay. The reader sees the messages in the new log-time order."""
    store = bags.typestore()
    writer = Writer(dst, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    conns = {}
    with Reader(src) as reader:
        for conn, t, raw in reader.messages():
            msg = store.deserialize_cdr(raw, conn.msgtype)
            stamp = bags._stamp(msg.header.stamp) if hasattr(msg, 'header') else t
            dt = shift(conn.topic, stamp)
            if dt is None:
                continue
            if conn.topic not in conns:
                conns[conn.topic] = writer.add_connection(conn.topic, conn.msgtype, typestore=store)
            writer.write(conns[conn.topic], t + dt, raw)
    writer.close()
    return dst


def test_reader_holds_a_bounded_window(tmp_path):
    """The reader holds a few frames' raw messages whatever the bag's length: 20 or 120 frames, the same peak."""
    frames = make_frames(1, size=(32, 24))
    peaks = []
    for n in (20, 120):
        many = [Frame(seq=0, index=k, stamp_ns=STAMP0 + k * 100_000_000, image=frames[0].image, K=frames[0].K,
                      T_map_cam=frames[0].T_map_cam, depth=frames[0].depth, landmarks=frames[0].landmarks)
                for k in range(n)]
        bags.write_sequence(tmp_path / f'b{n}', many)
        reader = bags.BagReader(tmp_path / f'b{n}', progress=False)
        assert sum(1 for _ in reader) == n == reader.report.matched
        peaks.append(reader.peak_held)
    # 5 topics per frame: the frame going out, the one before it (pruned next) and the one that lets it go
    assert peaks[0] == peaks[1] <= 15, peaks
    # Matching that never succeeds (the poses' stamps 1000 s behind the images') still holds only the window:
    # each image waits window_ns (0.5 s of log time, 5 frames) for a pose, then is dropped and counted.

    def behind(topic, msg, t):
        if topic == '/globloc/gt_pose':
            msg.header.stamp.sec -= 1000
        return msg
    reader = bags.BagReader(rewrite(tmp_path / 'b120', tmp_path / 'behind', behind), progress=False,
                            window_ns=500_000_000)
    with pytest.raises(BagError, match='no readable frames'):
        list(reader)
    assert reader.report.unmatched == {'no /globloc/gt_pose within 1 ms': 120}
    assert reader.peak_held <= 7 * 5, reader.peak_held  # a window of frames, 5 topics each (of 600 messages)


def test_messages_out_of_order_within_the_window_match(tiny_scene, tmp_path):
    """Poses logged 0.3 s after their image, depth 0.2 s before it, landmarks 0.35 s after: the same frames as
    the bag in order. Past the window, a pose comes too late and its image is dropped, counted."""
    good = bags.read_sequence(seq0(tiny_scene), progress=False)
    late = {'/globloc/gt_pose': 300_000_000, '/camera/depth/image_raw': -200_000_000,
            '/globloc/landmarks': 350_000_000}
    seq = bags.read_sequence(relog(seq0(tiny_scene), tmp_path / 'shuffled', lambda t, s: late.get(t, 0)),
                             progress=False)
    assert not seq.report.unmatched and not seq.report.missing and len(seq.frames) == len(good.frames)
    for a, b in zip(good.frames, seq.frames):
        assert a.stamp_ns == b.stamp_ns
        np.testing.assert_array_equal(a.T_map_cam, b.T_map_cam)
        np.testing.assert_array_equal(a.depth, b.depth)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
    stamps = [f.stamp_ns for f in good.frames]
    slow = {stamps[5]: 3_000_000_000}  # one pose 3 s late: past the 1 s window
    seq = bags.read_sequence(relog(seq0(tiny_scene), tmp_path / 'slow',
                                   lambda t, s: slow.get(s, 0) if t == '/globloc/gt_pose' else 0), progress=False)
    assert seq.report.unmatched == {'no /globloc/gt_pose within 1 ms': 1}
    assert [f.stamp_ns for f in seq.frames] == stamps[:5] + stamps[6:]
    assert [f.index for f in seq.frames] == list(range(23))


def test_images_out_of_order_are_sorted_or_dropped(tiny_scene, tmp_path):
    """Two images swapped in the log (within the window) come out in stamp order; one logged 3 s late (past the
    window, after later images were read) is dropped and counted; a duplicate stamp is dropped and counted."""
    stamps = [f.stamp_ns for f in bags.read_sequence(seq0(tiny_scene), progress=False).frames]
    moved = {stamps[3]: 150_000_000, stamps[10]: 3_000_000_000}

    def shift(topic, s):
        return moved.get(s, 0) if topic == '/camera/image_raw' else 0
    seq = bags.read_sequence(relog(seq0(tiny_scene), tmp_path / 'swapped', shift), progress=False)
    assert [f.stamp_ns for f in seq.frames] == [s for s in stamps if s != stamps[10]]
    assert seq.report.unmatched == {'image stamp before the last one read (out of order by more than 1 s)': 1}

    store = bags.typestore()
    writer = Writer(tmp_path / 'dup', version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    conns = {}
    with Reader(seq0(tiny_scene)) as reader:
        for conn, t, raw in reader.messages():
            if conn.topic not in conns:
                conns[conn.topic] = writer.add_connection(conn.topic, conn.msgtype, typestore=store)
            for _ in range(2 if conn.topic == '/camera/image_raw' and t == stamps[7] else 1):
                writer.write(conns[conn.topic], t, raw)
    writer.close()
    seq = bags.read_sequence(tmp_path / 'dup', progress=False)
    assert seq.report.unmatched == {'duplicate image stamp': 1} and len(seq.frames) == 24


def test_latched_camera_info_recorded_last(tmp_path):
    """A bag's only CameraInfo applies to every image, even when it was recorded after all of them."""
    frames = make_frames(4)
    bags.write_sequence(tmp_path / 'once', frames, camera_info_once=True)
    path = relog(tmp_path / 'once', tmp_path / 'last', lambda t, s: 10**10 if t == '/camera/camera_info' else 0)
    seq = bags.read_sequence(path, progress=False)
    assert len(seq.frames) == 4 and all(np.array_equal(f.K, frames[0].K) for f in seq.frames)


def test_max_frames_stops_reading(tiny_scene):
    reader = bags.BagReader(seq0(tiny_scene), max_frames=3, progress=False)
    assert [f.index for f in reader] == [0, 1, 2]
    assert reader.report.counts['/camera/image_raw'] < 10  # it stopped, not read to the end
    assert len(list(bags.iter_frames(seq0(tiny_scene), progress=False))) == 24
    with pytest.raises(RuntimeError, match='reads its bag once'):
        list(reader)


def test_info_streams_the_summary_of_the_frames_read(tiny_scene):
    seqs = bags.read_bags([tiny_scene], progress=False)
    summary = bags.summarise_bags([tiny_scene], progress=False)
    assert [b['matched_frames'] for b in summary['bags']] == [len(s.frames) for s in seqs]
    centres = np.array([f.T_map_cam[:3, 3] for s in seqs for f in s.frames])
    np.testing.assert_allclose(summary['camera_centres_bbox'], [centres.min(0), centres.max(0)], atol=1e-3)
