"""The localizer node over real DDS: the node runs as its console script (globloc-localizer) in a child
process; this process publishes camera frames from a bag (and TF), and listens to the poses, TF,
/diagnostics and initialpose. Nothing of rclpy is mocked.

Two node configurations run one after the other (class-scoped, so their TF trees never meet):
- TestCameraTF: raw images, publish_tf=map_to_camera, permissive gating (every frame gets a pose);
  offline equality, TF, ~/relocalize, bad input, a flood of large frames.
- TestOdomCompressed: jpeg images, publish_tf=map_to_odom over a test odom->base_link->camera chain,
  base_frame=base_link, relocalize_on_start, a residual threshold that rejects about half the frames.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip('rclpy')
tf2_ros = pytest.importorskip('tf2_ros', reason='tf2_ros comes from the ROS overlay (shared/ros-overlay)')

from geometry_msgs.msg import TransformStamped  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.time import Time  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from globloc_ros import frames as fr  # noqa: E402
from ros_helpers import DEPTH_TOPIC, Peer, camera_info_msg, encode_jpeg, image_msg, ns_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCALIZER = BIN / 'globloc-localizer'
CAM_B = 'camera_b_optical'  # TestOdomCompressed's camera frame: its TF tree shares nothing with TestCameraTF's
PERMISSIVE = ['-p', 'max_residual_m:=1000000.0', '-p', 'min_effective_points:=0.0']
T_BASE_CAM = fr.pose_from_xyz_quat([0.1, 0.0, 0.3], [-0.5, 0.5, -0.5, 0.5])  # optical frame on a robot base
A_ODOM_MAP = fr.pose_from_xyz_quat([1.0, -2.0, 0.0], [0.0, 0.0, np.sin(0.3), np.cos(0.3)])  # odom drifted from map


# ------------------------------------------------------------------------------------------------ helpers
# (the fixtures ros_env, setup and peer, shared with test_launch and test_colcon, are conftest's)
def offline(model: Path, max_residual_m: float = 1e6, min_effective_points: float = 0.0):
    from globloc_ros.runtime import Localizer
    return Localizer(model, max_residual_m=max_residual_m, min_effective_points=min_effective_points)


def depth_msg(depth_m: np.ndarray, stamp_ns: int) -> Image:
    """16UC1 millimetres (0 = no reading), as RGB-D drivers publish it."""
    mm = np.nan_to_num(depth_m * 1000.0).round().astype(np.uint16)
    h, w = mm.shape
    return Image(header=Header(stamp=Time(nanoseconds=stamp_ns).to_msg()), height=h, width=w, encoding='16UC1',
                 is_bigendian=0, step=w * 2, data=mm.tobytes())


def pose_matrix(pose) -> np.ndarray:
    p, q = pose.position, pose.orientation
    return fr.pose_from_xyz_quat([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])


def tf_matrix(tf) -> np.ndarray:
    t, q = tf.transform.translation, tf.transform.rotation
    return fr.pose_from_xyz_quat([t.x, t.y, t.z], [q.x, q.y, q.z, q.w])


def assert_pose_close(T: np.ndarray, T_ref: np.ndarray, tol_m: float = 1e-4, tol_r: float = 1e-5) -> None:
    """Translation within tol_m metres, rotation matrices within tol_r per entry (the angle from arccos has
    a noise floor of ~0.03 deg at float32 precision, so entries are compared instead)."""
    dt = np.linalg.norm(T[:3, 3] - T_ref[:3, 3])
    dr = np.abs(T[:3, :3] - T_ref[:3, :3]).max()
    assert dt <= tol_m and dr <= tol_r, f'pose differs by {dt:.2e} m, {dr:.2e} in R'


class NodeProcess:
    """globloc-localizer as a child process in its own session; stop() ends the whole group."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        self.log = open(log, 'w')
        self.proc = subprocess.Popen([str(LOCALIZER), '--ros-args', *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def rss_mb(self) -> float:
        with open(f'/proc/{self.proc.pid}/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024

    def stop(self) -> int:
        for sig in (signal.SIGINT, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self.log.close()
        return self.proc.returncode


def start_node(peer: Peer, args: list[str], log: Path) -> NodeProcess:
    """Start the node and wait for its first diagnostics (it is then subscribed and ready)."""
    peer.reset()
    node = NodeProcess(args, log)
    ok = peer.wait(lambda: peer.n_diag > 0 or node.proc.poll() is not None, timeout=40)
    if not ok or not node.alive():
        out = node.output()
        node.stop()
        pytest.fail(f'node did not come up (exit {node.proc.returncode}):\n{out}')
    # Discovery of our publishers by the node's subscriptions can trail its first diagnostics.
    assert peer.wait(lambda: peer.pub_info.get_subscription_count() > 0, timeout=10)
    return node


# ------------------------------------------------------------------------------------------------ checks without DDS
def test_params_file_equals_the_parameter_table():
    from globloc_ros.node import PARAMETERS
    params = yaml.safe_load((REPO / 'config' / 'localizer.yaml').read_text())['/**']['ros__parameters']
    assert params == {p.name: p.default for p in PARAMETERS}


def test_rviz_config_shows_the_node_outputs_in_the_map_frame():
    rviz = yaml.safe_load((REPO / 'config' / 'globloc.rviz').read_text())['Visualization Manager']
    assert rviz['Global Options']['Fixed Frame'] == 'map'
    shown = {d['Class']: d.get('Topic', {}).get('Value') for d in rviz['Displays']}
    assert shown['rviz_default_plugins/Image'] == '/camera/image_raw'
    assert shown['rviz_default_plugins/Pose'] == '/globloc/pose'
    assert shown['rviz_default_plugins/Path'] == '/globloc/path'
    assert shown['rviz_default_plugins/PointCloud2'] == '/globloc/map_cloud'
    cloud = next(d for d in rviz['Displays'] if d['Class'] == 'rviz_default_plugins/PointCloud2')
    assert cloud['Topic']['Durability Policy'] == 'Transient Local'  # published once, at start
    assert 'rviz_default_plugins/TF' in shown


def test_stamp_buffer_finds_the_frames_depth_or_gives_up():
    from types import SimpleNamespace

    from globloc_ros.node import StampBuffer

    def msg(ns):
        return SimpleNamespace(header=SimpleNamespace(stamp=Time(nanoseconds=ns).to_msg()), id=ns)
    buf = StampBuffer(size=3)
    for ns in (1_000_000_000, 1_033_000_000, 1_066_000_000):
        buf.put(msg(ns))
    assert buf.find(1_034_000_000, 10_000_000, 0.0).id == 1_033_000_000  # the nearest within tolerance
    t0 = time.monotonic()
    assert buf.find(1_020_000_000, 5_000_000, 1.0) is None  # a later depth already came: no waiting
    assert time.monotonic() - t0 < 0.1
    threading.Timer(0.1, buf.put, [msg(1_100_000_000)]).start()  # arrives while find() waits
    assert buf.find(1_100_000_000, 0, 2.0).id == 1_100_000_000
    t0 = time.monotonic()
    assert buf.find(1_200_000_000, 0, 0.2) is None and 0.15 < time.monotonic() - t0 < 1.0  # waited, then gave up
    buf.put(msg(1_133_000_000))
    assert buf.find(1_000_000_000, 0, 0.0) is None  # only the last 3 are kept


def test_node_module_needs_no_tf2_at_import():
    code = 'import sys, globloc_ros.node; sys.exit(1 if "tf2_ros" in sys.modules else 0)'
    assert subprocess.run([sys.executable, '-c', code], timeout=60).returncode == 0


@pytest.mark.parametrize('args, expect', [
    (['-p', 'model:=/nonexistent/model.pt'], r"parameter 'model': file not found: /nonexistent/model\.pt"),
    (['-p', 'model:=CORRUPT'], r"parameter 'model' \(.*corrupt\.pt\): .*corrupt"),
    (['-p', 'publish_tf:=map_to_moon'], r"parameter 'publish_tf': 'map_to_moon' is not one of"),
    (['-p', 'max_residual_m:=-1.0'], r"parameter 'max_residual_m': .*out of range"),  # rclpy checks the range
    (['-p', 'min_effective_points:=-1'], r"parameter 'min_effective_points': -1\.0 is outside"),  # we check ints
    (['-p', 'threads:=many'], r"parameter 'threads': expected an int, got 'many'"),
    (['-p', 'publish_tf:=yes'], r"parameter 'publish_tf': expected one of none, map_to_camera, map_to_odom, got True "
                                r"\(bool: yes, no, on, off, true and false read as booleans\)"),
    (['-p', 'place_map:=/nonexistent/place.map.npz'],
     r"parameter 'place_map': map file not found: /nonexistent/place\.map\.npz"),
    (['-p', 'place_map:=TRUNCATED'], r"parameter 'place_map': .*truncated\.map\.npz: not a readable globloc map"),
])
def test_bad_model_or_parameter_exits_nonzero_with_a_clear_message(args, expect, setup, ros_env, tmp_path):
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'PK\x03\x04 this is not a model' * 10)
    truncated = tmp_path / 'truncated.map.npz'  # a map file cut short, as by a full disk or an interrupted copy
    np.savez_compressed(truncated, points=np.zeros((1000, 3), np.float32), header='{}')
    truncated.write_bytes(truncated.read_bytes()[:300])
    args = [a.replace('CORRUPT', str(corrupt)).replace('TRUNCATED', str(truncated)) for a in args]
    if not any(a.startswith('model:=') for a in args):
        args += ['-p', f'model:={setup["model"]}']
    run = subprocess.run([str(LOCALIZER), '--ros-args', *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert re.search(expect, run.stderr), run.stderr
    assert 'Traceback' not in run.stderr


def test_tf_requested_without_tf2_ros_exits_with_a_clear_message(setup, ros_env, tmp_path):
    fake = tmp_path / 'no_tf2' / 'tf2_ros'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('No module named tf2_ros (simulated)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get('PYTHONPATH', '')]))
    run = subprocess.run([str(LOCALIZER), '--ros-args', '-p', f'model:={setup["model"]}', '-p',
                          'publish_tf:=map_to_camera'], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and 'publish_tf=map_to_camera needs tf2_ros' in run.stderr, run.stderr


# ------------------------------------------------------------------------------------------------ map -> camera
class TestCameraTF:
    @pytest.fixture(scope='class')
    def node(self, peer, setup, tmp_path_factory):
        log = tmp_path_factory.mktemp('node_a') / 'node.log'
        node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', 'publish_tf:=map_to_camera',
                                 '-p', 'diagnostics_period:=0.1', *PERMISSIVE], log)
        yield node
        assert node.stop() == 0, node.output()

    def test_without_a_map_it_warns_that_poses_go_out_unverified(self, node):
        assert 'no place_map: confident one-shot poses go out unverified' in node.output()

    def test_poses_equal_the_offline_localizer_and_carry_the_image_stamp(self, node, peer, setup):
        lz = offline(setup['model'])
        errors = []
        for f in setup['frames']:
            stamp = peer.send(f)
            assert peer.wait(lambda: stamp in peer.poses and stamp in peer.poses_cov, 10), \
                f'no pose for stamp {stamp}:\n{node.output()}'
            ref = lz.localize(f.image, f.K)
            with peer.lock:
                msg, cov_msg = peer.poses[stamp], peer.poses_cov[stamp]
            assert msg.header.frame_id == 'map' and ns_of(msg.header.stamp) == f.stamp_ns
            T = pose_matrix(msg.pose)
            assert_pose_close(T, ref.T_map_cam)
            assert_pose_close(pose_matrix(cov_msg.pose.pose), ref.T_map_cam)
            np.testing.assert_allclose(np.reshape(cov_msg.pose.covariance, (6, 6)), ref.covariance,
                                       rtol=1e-3, atol=1e-9)
            errors.append(fr.pose_errors(T, f.T_map_cam)[0])
        assert set(peer.poses) == {f.stamp_ns for f in setup['frames']}
        # ~/path: the trajectory so far, newest last, for RViz.
        assert peer.wait(lambda: peer.path is not None and ns_of(peer.path.poses[-1].header.stamp) == f.stamp_ns, 5)
        assert [ns_of(p.header.stamp) for p in peer.path.poses][-len(errors):] == [f.stamp_ns for f in setup['frames']]
        # The node is the offline model, so its accuracy is the model's: tiny_model's held-out median error is a
        # few decimetres in the 6 x 5 m room.
        print(f'node vs GT on the held-out sequence: median {np.median(errors):.3f} m, max {np.max(errors):.3f} m')
        assert np.median(errors) < 0.5

    def test_tf_map_to_camera_resolves_to_the_published_pose(self, node, peer, setup):
        for f in setup['frames'][:5]:
            stamp = peer.send(f, stamp_ns=f.stamp_ns + 5_000_000_000)  # new stamps: TF is never rewritten
            assert peer.wait(lambda: stamp in peer.poses, 10)
            tf = peer.tf_buffer.lookup_transform('map', f.frame_id, Time(nanoseconds=stamp),
                                                 timeout=rclpy.duration.Duration(seconds=5))
            assert_pose_close(tf_matrix(tf), pose_matrix(peer.poses[stamp].pose), 1e-6, 1e-6)

    def test_relocalize_publishes_the_next_pose_once_on_initialpose(self, node, peer, setup):
        assert peer.relocalize.wait_for_service(timeout_sec=10)
        future = peer.relocalize.call_async(Trigger.Request())
        assert peer.wait(future.done, 10) and future.result().success
        f = setup['frames'][3]
        first = peer.send(f, stamp_ns=f.stamp_ns + 7_000_000_000)
        assert peer.wait(lambda: len(peer.initial) >= 1, 10)
        second = peer.send(f, stamp_ns=f.stamp_ns + 8_000_000_000)
        assert peer.wait(lambda: second in peer.poses, 10)
        time.sleep(0.3)
        with peer.lock:
            assert len(peer.initial) == 1, 'initialpose must be published once per request'
            init, pose = peer.initial[0], peer.poses_cov[first]
        assert ns_of(init.header.stamp) == first and init.header.frame_id == 'map'
        assert_pose_close(pose_matrix(init.pose.pose), pose_matrix(pose.pose.pose), 1e-9, 1e-9)
        assert list(init.pose.covariance) == list(pose.pose.covariance)

    BAD_INPUT = {
        'unknown encoding': ('bad_image', 'Image.encoding',  # a depth image on the colour topic
                             lambda f: dict(image=_set(image_msg(f.image), encoding='32FC1'))),
        'data shorter than step*height': ('bad_image', 'Image.data',
                                          lambda f: dict(image=_set(image_msg(f.image), data=bytes(100)))),
        'zero-size image': ('bad_image', 'zero-size',
                            lambda f: dict(image=Image(height=0, width=0, step=0, encoding='rgb8'))),
        'size disagrees with CameraInfo': ('bad_image', 'CameraInfo.width/height says',
                                           lambda f: dict(image=image_msg(f.image[:60, :80]))),
        'zero focal length': ('bad_camera_info', 'zero or negative focal length',
                              lambda f: dict(info=camera_info_msg(np.diag([0.0, 0.0, 1.0]), 160, 120))),
        'NaN in K': ('bad_camera_info', 'NaN',
                     lambda f: dict(info=camera_info_msg(np.where(np.eye(3) > 0, np.nan, f.K), 160, 120))),
    }

    @pytest.mark.parametrize('case', list(BAD_INPUT))
    def test_bad_input_is_counted_not_published_and_the_node_carries_on(self, case, node, peer, setup):
        category, words, make = self.BAD_INPUT[case]
        f = setup['frames'][5]
        before = peer.fresh_diag()
        bad = peer.send(f, stamp_ns=f.stamp_ns + 20_000_000_000 + len(case), **make(f))
        key = f'frames_{category}'
        assert peer.wait(lambda: int(peer.diag.get(key, 0)) > int(before[key]), 10), \
            f'{case}: {key} did not increase: {peer.diag}'
        assert words in peer.diag[f'last_reason_{category}']
        assert bad not in peer.poses
        assert node.alive()
        good = peer.send(f, stamp_ns=f.stamp_ns + 30_000_000_000 + len(case))  # valid CameraInfo again
        assert peer.wait(lambda: good in peer.poses, 10), f'no pose after {case}:\n{node.output()}'
        assert bad not in peer.poses

    def test_a_flood_of_large_frames_keeps_memory_bounded_and_counts_drops(self, node, peer, setup):
        f = setup['frames'][2]
        big = cv2.resize(f.image, (640, 480), interpolation=cv2.INTER_LINEAR)  # 0.9 MB per frame
        K = fr.scale_intrinsics(f.K, 4.0, 4.0)
        info, img = camera_info_msg(K, 640, 480), image_msg(big)
        before = peer.fresh_diag()
        rss0, peak = node.rss_mb(), 0.0
        n, t0 = 400, time.monotonic()
        for k in range(n):
            stamp = Time(nanoseconds=f.stamp_ns + 40_000_000_000 + k * 1_000_000).to_msg()
            info.header.stamp = img.header.stamp = stamp
            img.header.frame_id = info.header.frame_id = f.frame_id
            peer.pub_info.publish(info)
            peer.pub_image.publish(img)
            if k % 20 == 0:
                peak = max(peak, node.rss_mb())
        send_rate = n / (time.monotonic() - t0)
        after = peer.fresh_diag()
        peak = max(peak, node.rss_mb())
        assert node.alive()
        published = int(after['frames_published']) - int(before['frames_published'])
        dropped = int(after['frames_dropped']) - int(before['frames_dropped'])
        received = int(after['frames_received']) - int(before['frames_received'])
        assert dropped > 0 and published < n and received <= n, (published, dropped, received)
        # 400 queued frames would be 370 MB: the node holds at most a few.
        print(f'flood: {n} frames of 640x480 at {send_rate:.0f}/s: received {received}, published {published}, '
              f'dropped {dropped}; RSS {rss0:.0f} -> peak {peak:.0f} MiB')
        assert peak - rss0 < 150, f'RSS grew from {rss0:.0f} to {peak:.0f} MiB at {send_rate:.0f} frames/s'
        last = peer.send(f, stamp_ns=f.stamp_ns + 50_000_000_000)
        assert peer.wait(lambda: last in peer.poses, 10)


def _set(msg, **fields):
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg


# ------------------------------------------------------------------------------------------------ map -> odom
class TestOdomCompressed:
    @pytest.fixture(scope='class')
    def run(self, peer, setup, tmp_path_factory):
        """Start the node, check it waits for CameraInfo, then send every frame as jpeg with odom TF."""
        frames = setup['frames']
        jpegs = [encode_jpeg(f.image) for f in frames]
        decoded = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].copy() for j in jpegs]
        residuals = sorted(offline(setup['model']).localize(rgb, f.K).residual for f, rgb in zip(frames, decoded))
        mid = len(residuals) // 2  # a threshold between two residuals: about half the frames are rejected
        threshold = 0.5 * (residuals[mid - 1] + residuals[mid])
        lz = offline(setup['model'], max_residual_m=threshold)
        refs = [lz.localize(rgb, f.K) for f, rgb in zip(frames, decoded)]
        log = tmp_path_factory.mktemp('node_b') / 'node.log'
        node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', 'image_transport:=compressed',
                                 '-p', 'publish_tf:=map_to_odom', '-p', 'base_frame:=base_link',
                                 '-p', 'relocalize_on_start:=true', '-p', 'tf_timeout:=2.0',
                                 '-p', 'diagnostics_period:=0.1', '-p', 'min_effective_points:=0.0',
                                 '-p', f'max_residual_m:={threshold!r}'], log)
        out = {'node': node, 'refs': refs, 'threshold': threshold}
        try:
            # No CameraInfo yet: the frame is counted and nothing is published.
            early = peer.send(frames[0], stamp_ns=frames[0].stamp_ns - 1_000_000_000, info=False,
                              compressed=True, jpeg=jpegs[0], frame_id=CAM_B)
            assert peer.wait(lambda: int(peer.diag.get('frames_no_camera_info', 0)) >= 1, 10)
            out['early'] = (early, dict(peer.diag))
            static = TransformStamped(child_frame_id=CAM_B)
            static.header.frame_id = 'base_link'
            static.transform = _transform(T_BASE_CAM)
            peer.tf_static.sendTransform(static)
            rejected = 0
            for f, jpeg, ref in zip(frames, jpegs, refs):
                odom = TransformStamped(child_frame_id='base_link')
                odom.header.frame_id, odom.header.stamp = 'odom', Time(nanoseconds=f.stamp_ns).to_msg()
                odom.transform = _transform(A_ODOM_MAP @ f.T_map_cam @ fr.invert_pose(T_BASE_CAM))
                peer.tf_broadcaster.sendTransform(odom)
                stamp = peer.send(f, compressed=True, jpeg=jpeg, frame_id=CAM_B)
                rejected += not ref.confident
                done = ((lambda: stamp in peer.poses) if ref.confident else
                        (lambda: int(peer.diag.get('frames_rejected', 0)) >= rejected))
                assert peer.wait(done, 10), f'frame {stamp} (confident: {ref.confident}) neither published nor ' \
                                            f'rejected:\n{node.output()}'
            out['diag'] = peer.fresh_diag()
            out['poses'] = dict(peer.poses)
            out['initial'] = list(peer.initial)
            out['map_to_cam'] = {}
            for f in frames:
                if f.stamp_ns in out['poses']:
                    tf = peer.tf_buffer.lookup_transform('map', CAM_B, Time(nanoseconds=f.stamp_ns),
                                                         timeout=rclpy.duration.Duration(seconds=5))
                    out['map_to_cam'][f.stamp_ns] = tf_matrix(tf)
            # Corrupt jpeg: counted as a bad image, no pose, node alive.
            before = int(peer.diag['frames_bad_image'])
            bad = peer.send(frames[1], stamp_ns=frames[1].stamp_ns + 60_000_000_000, compressed=True,
                            jpeg=jpegs[1][:40] + bytes(len(jpegs[1]) - 40), frame_id=CAM_B)
            peer.wait(lambda: int(peer.diag.get('frames_bad_image', 0)) > before, 10)
            out['corrupt'] = (bad, dict(peer.diag), bad in peer.poses, node.alive())
            yield out
        finally:
            assert node.stop() == 0, node.output()

    def test_no_frame_is_processed_before_camera_info(self, run):
        early, diag = run['early']
        assert int(diag['frames_no_camera_info']) == 1 and early not in run['poses']
        assert 'no CameraInfo' in diag['last_reason_no_camera_info']

    def test_non_confident_poses_are_rejected_with_the_reason(self, run, setup):
        confident = {f.stamp_ns for f, r in zip(setup['frames'], run['refs']) if r.confident}
        assert 0 < len(confident) < len(setup['frames'])
        assert set(run['poses']) == confident
        assert int(run['diag']['frames_rejected']) == len(setup['frames']) - len(confident)
        assert 'residual' in run['diag']['last_reason_rejected']

    def test_jpeg_poses_equal_the_offline_localizer(self, run, setup):
        for f, ref in zip(setup['frames'], run['refs']):
            if f.stamp_ns in run['poses']:
                assert_pose_close(pose_matrix(run['poses'][f.stamp_ns].pose), ref.T_map_cam)

    def test_map_to_odom_chain_resolves_to_the_published_pose(self, run):
        assert run['map_to_cam'], 'no map -> camera transform resolved'
        assert int(run['diag']['tf_failures']) == 0
        for stamp, T in run['map_to_cam'].items():
            assert_pose_close(T, pose_matrix(run['poses'][stamp].pose), 1e-6, 1e-6)

    def test_relocalize_on_start_publishes_the_base_pose_once(self, run, setup):
        assert len(run['initial']) == 1
        init = run['initial'][0]
        first = min(run['poses'])  # the first confident frame
        assert ns_of(init.header.stamp) == first and init.header.frame_id == 'map'
        expected = pose_matrix(run['poses'][first].pose) @ fr.invert_pose(T_BASE_CAM)
        assert_pose_close(pose_matrix(init.pose.pose), expected, 1e-6, 1e-6)

    def test_corrupt_jpeg_is_counted_and_the_node_carries_on(self, run):
        bad, diag, published, alive = run['corrupt']
        assert alive and not published
        assert int(diag['frames_bad_image']) >= 1
        assert 'CompressedImage.data' in diag['last_reason_bad_image']


def _transform(T: np.ndarray):
    from geometry_msgs.msg import Transform
    from globloc_ros.node import _transform_msg
    out: Transform = _transform_msg(T)
    return out


# ------------------------------------------------------------------------------------------------ RGB-D
class TestDepth:
    @pytest.fixture(scope='class')
    def node(self, peer, setup, tmp_path_factory):
        log = tmp_path_factory.mktemp('node_depth') / 'node.log'
        node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', f'depth_topic:={DEPTH_TOPIC}',
                                 '-p', 'depth_wait:=0.5', '-p', 'diagnostics_period:=0.1', *PERMISSIVE], log)
        assert peer.wait(lambda: peer.pub_depth.get_subscription_count() > 0, timeout=10)
        yield node
        assert node.stop() == 0, node.output()

    def test_the_frames_depth_image_replaces_the_depth_head(self, node, peer, setup):
        lz = offline(setup['model'])
        frames = setup['frames'][:6]
        for k, f in enumerate(frames):
            stamp = f.stamp_ns + 20_000_000_000
            msg = depth_msg(f.depth, stamp)
            if k % 2 == 0:  # depth before the image, or after it (the node waits up to depth_wait for it)
                peer.pub_depth.publish(msg)
            peer.send(f, stamp_ns=stamp)
            if k % 2 == 1:
                time.sleep(0.05)
                peer.pub_depth.publish(msg)
            assert peer.wait(lambda: stamp in peer.poses, 10), node.output()
            rgbd = lz.localize(f.image, f.K, np.round(f.depth * 1000) / 1000)  # what survives 16UC1
            assert_pose_close(pose_matrix(peer.poses[stamp].pose), rgbd.T_map_cam)
            assert np.linalg.norm(rgbd.T_map_cam[:3, 3] - lz.localize(f.image, f.K).T_map_cam[:3, 3]) > 1e-3
        diag = peer.fresh_diag()
        assert int(diag['frames_with_depth']) == len(frames) and int(diag['frames_without_depth']) == 0
        assert float(diag['measured_depth']) > 0.5

    def test_a_frame_without_usable_depth_is_localized_from_the_image(self, node, peer, setup):
        lz = offline(setup['model'])
        f = setup['frames'][7]
        before = int(peer.fresh_diag()['frames_without_depth'])
        stamp = peer.send(f, stamp_ns=f.stamp_ns + 30_000_000_000)  # no depth at all: published after depth_wait
        assert peer.wait(lambda: stamp in peer.poses, 10), node.output()
        assert_pose_close(pose_matrix(peer.poses[stamp].pose), lz.localize(f.image, f.K).T_map_cam)
        diag = peer.fresh_diag()
        assert int(diag['frames_without_depth']) == before + 1
        assert f'no depth image on {DEPTH_TOPIC} within 0.01 s' in diag['last_reason_depth']
        # A depth image of another size is not registered to this camera: reported, the image alone is used.
        stamp = f.stamp_ns + 31_000_000_000
        peer.pub_depth.publish(depth_msg(f.depth[:, :-8], stamp))
        peer.send(f, stamp_ns=stamp)
        assert peer.wait(lambda: stamp in peer.poses, 10), node.output()
        assert_pose_close(pose_matrix(peer.poses[stamp].pose), lz.localize(f.image, f.K).T_map_cam)
        diag = peer.fresh_diag()
        assert int(diag['frames_without_depth']) == before + 2
        assert 'CameraInfo.width/height says' in diag['last_reason_depth'] and node.alive()


@pytest.fixture(scope='module')
def map_path(setup, tmp_path_factory):
    """A place map of the tiny scene's training sequences."""
    from globloc.bags import read_sequence
    from globloc_ros.placemap import View, build_map, save_map
    scene = setup['bag'].parent
    views = [View(f.image, f.K, f.T_map_cam, f.depth) for i in (0, 1)
             for f in read_sequence(scene / f'seq_0{i}', seq=i, progress=False).frames]
    path = tmp_path_factory.mktemp('map') / 'train.map.npz'
    save_map(build_map(views), path)
    return path


class TestDepthMap:
    """RGB-D with a map of the training sequences: the node publishes what the offline Localizer with the same map
    gives, refined (ICP with the frame's depth, image features for a frame without) or, where the refinement
    refuses, one-shot, and counts both."""

    @pytest.fixture(scope='class')
    def node(self, peer, setup, map_path, tmp_path_factory):
        log = tmp_path_factory.mktemp('node_map') / 'node.log'
        # Reliable camera subscriptions: every frame's pose is checked, and a best-effort image can be lost on a
        # loaded machine (seen once, with a training beside the suite).
        node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', f'depth_topic:={DEPTH_TOPIC}',
                                 '-p', f'place_map:={map_path}', '-p', 'depth_wait:=0.5', '-p', 'qos:=reliable',
                                 '-p', 'diagnostics_period:=0.1', '-p', 'prior_timeout:=0.0', *PERMISSIVE], log)
        assert peer.wait(lambda: peer.pub_depth.get_subscription_count() > 0, timeout=10)
        assert 'no place_map' not in node.output()
        yield node
        assert node.stop() == 0, node.output()

    def test_the_map_is_published_once_for_rviz(self, node, peer, map_path):
        from sensor_msgs.msg import PointCloud2

        from globloc_ros.placemap import load_map
        got = []
        sub = peer.node.create_subscription(PointCloud2, '/globloc/map_cloud', got.append, QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        try:
            assert peer.wait(lambda: got, 10), node.output()  # subscribed after it was published: transient local
        finally:
            peer.node.destroy_subscription(sub)
        msg, points = got[0], load_map(map_path).points
        assert msg.header.frame_id == 'map' and msg.point_step == 12 and [f.name for f in msg.fields] == list('xyz')
        xyz = np.frombuffer(bytes(msg.data), '<f4').reshape(-1, 3)
        assert len(xyz) == msg.width == len(points) and np.array_equal(xyz, points)  # a small map goes out whole

    def test_published_poses_are_the_refined_ones(self, node, peer, setup, map_path):
        """Each frame gives what the Localizer gives it offline (no prior: prior_timeout 0): a pose the map
        verified (refined near the one-shot pose, or recovered), or nothing, counted as rejected."""
        from globloc_ros.runtime import Localizer
        lz = Localizer(setup['model'], place_map=map_path, max_residual_m=1e6, min_effective_points=0.0)
        refined = 0
        frames = setup['frames'][::3]
        rejected_before, rejected = int(peer.fresh_diag()['frames_rejected']), 0
        for k, f in enumerate(frames):
            stamp = f.stamp_ns + 40_000_000_000
            with_depth = k % 3 != 2  # every third frame comes without its depth image
            # what survives 16UC1
            ref = lz.localize(f.image, f.K, np.round(f.depth * 1000) / 1000 if with_depth else None)
            if with_depth:
                peer.pub_depth.publish(depth_msg(f.depth, stamp))
            peer.send(f, stamp_ns=stamp)
            if not ref.confident:
                assert ref.path == 'rejected' and 'not verified against the map' in ref.reason
                rejected += 1  # before the next frame: one frame at a time, none dropped by a busy node
                assert peer.wait(lambda: int(peer.diag['frames_rejected']) - rejected_before == rejected, 10)
                continue
            assert peer.wait(lambda: stamp in peer.poses and stamp in peer.poses_cov, 10), node.output()
            assert ref.path in ('refined', 'recovered') and ref.refinement.accepted
            assert ref.refinement.method.startswith('recovery' if ref.path == 'recovered' else
                                                    'icp' if with_depth else 'features')
            refined += 1
            with peer.lock:
                cov_msg = peer.poses_cov[stamp]
            assert_pose_close(pose_matrix(cov_msg.pose.pose), ref.T_map_cam)
            np.testing.assert_allclose(np.reshape(cov_msg.pose.covariance, (6, 6)), ref.covariance,
                                       rtol=1e-3, atol=1e-12)
        diag = peer.fresh_diag()
        paths = {p: int(diag[f'frames_{p}']) for p in ('refined', 'tracked', 'recovered')}
        assert sum(paths.values()) == refined and refined > 0 and 0 < float(diag['refine_inliers']) <= 1
        assert int(diag['frames_rejected']) - rejected_before == rejected == len(frames) - refined


# ------------------------------------------------------------------------------------------------ camera drivers
COMPRESSED_DEPTH_TOPIC = '/camera/depth/image_raw/compressedDepth'
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def encoded_msg(rgb: np.ndarray, encoding: str) -> Image:
    """`rgb` (H, W, 3) as a camera driver publishes it: bgra8, 8UC3, bgr16 (big endian, rows padded) or yuv422."""
    h, w = rgb.shape[:2]
    if encoding == 'yuv422':
        return Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 2,
                     data=cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY).tobytes())
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if encoding == 'bgra8':
        rows = np.concatenate([bgr, np.full((h, w, 1), 255, np.uint8)], axis=2).reshape(h, -1)
    elif encoding == '8UC3':
        rows = bgr.reshape(h, -1)
    else:  # bgr16, big endian, 6 bytes of padding per row
        rows = np.hstack([(bgr.astype('>u2') * 257).reshape(h, -1).view(np.uint8), np.zeros((h, 6), np.uint8)])
    return Image(height=h, width=w, encoding=encoding, is_bigendian=int(encoding == 'bgr16'), step=rows.shape[1],
                 data=rows.tobytes())


def compressed_depth_msg(depth_m: np.ndarray, stamp_ns: int) -> CompressedImage:
    """16UC1 millimetres as compressed_depth_image_transport publishes them: a 12-byte header, then a PNG."""
    mm = np.nan_to_num(depth_m * 1000.0).round().astype(np.uint16)
    ok, png = cv2.imencode('.png', mm)
    assert ok
    return CompressedImage(header=Header(stamp=Time(nanoseconds=stamp_ns).to_msg()),
                           format='16UC1; compressedDepth png', data=bytes(12) + png.tobytes())


class TestCameraDriver:
    """A camera driver as many are: CameraInfo published once, latched (transient local), before the node starts;
    images in the driver's own encoding; depth through compressed_depth_image_transport."""

    @pytest.fixture(scope='class')
    def node(self, peer, setup, tmp_path_factory):
        f = setup['frames'][0]
        driver = rclpy.create_node('latched_camera_driver')
        info_pub = driver.create_publisher(CameraInfo, '/camera/camera_info', LATCHED)
        info = camera_info_msg(f.K, f.image.shape[1], f.image.shape[0])
        info.header.frame_id = f.frame_id
        info_pub.publish(info)  # once, before the node exists
        depth_pub = peer.node.create_publisher(CompressedImage, COMPRESSED_DEPTH_TOPIC,
                                               QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
        log = tmp_path_factory.mktemp('node_driver') / 'node.log'
        node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', f'depth_topic:={COMPRESSED_DEPTH_TOPIC}',
                                 '-p', 'depth_wait:=0.5', '-p', 'diagnostics_period:=0.1', *PERMISSIVE], log)
        # Both of the node's CameraInfo subscriptions matched: per frame, and the transient-local one it makes on
        # discovering this latched publisher; the stored message then reaches it within milliseconds.
        assert peer.wait(lambda: info_pub.get_subscription_count() == 2 and depth_pub.get_subscription_count() > 0,
                         10), node.output()
        time.sleep(0.2)
        yield node, depth_pub
        assert node.stop() == 0, node.output()
        peer.node.destroy_publisher(depth_pub)
        driver.destroy_node()  # the latched CameraInfo goes with it: later nodes must not see it

    def test_latched_camera_info_reaches_a_node_started_after_it(self, node, peer, setup):
        lz = offline(setup['model'])
        for f in setup['frames'][:5]:
            stamp = peer.send(f, stamp_ns=f.stamp_ns + 70_000_000_000, info=False)  # no CameraInfo with the frames
            assert peer.wait(lambda: stamp in peer.poses, 10), f'no pose for {stamp}:\n{node[0].output()}'
            assert_pose_close(pose_matrix(peer.poses[stamp].pose), lz.localize(f.image, f.K).T_map_cam)
        diag = peer.fresh_diag()
        assert int(diag['frames_no_camera_info']) == 0 and int(diag['frames_bad_camera_info']) == 0

    @pytest.mark.parametrize('encoding', ['bgra8', '8UC3', 'bgr16', 'yuv422'])
    def test_the_drivers_encoding_is_localized_like_rgb8(self, encoding, node, peer, setup):
        from globloc_ros import imgmsg

        f = setup['frames'][6]
        msg = encoded_msg(f.image, encoding)
        stamp = peer.send(f, stamp_ns=f.stamp_ns + 71_000_000_000 + len(encoding), image=msg, info=False)
        assert peer.wait(lambda: stamp in peer.poses, 10), f'{encoding}: no pose:\n{peer.diag}'
        rgb = f.image if encoding != 'yuv422' else imgmsg.image_to_rgb(msg)  # the others are lossless
        assert_pose_close(pose_matrix(peer.poses[stamp].pose), offline(setup['model']).localize(rgb, f.K).T_map_cam)

    def test_compressed_depth_replaces_the_depth_head(self, node, peer, setup):
        lz = offline(setup['model'])
        before = peer.fresh_diag()  # the frames above came without depth
        frames = setup['frames'][8:11]
        for f in frames:
            stamp = f.stamp_ns + 72_000_000_000
            node[1].publish(compressed_depth_msg(f.depth, stamp))
            peer.send(f, stamp_ns=stamp, info=False)
            assert peer.wait(lambda: stamp in peer.poses, 10), node[0].output()
            rgbd = lz.localize(f.image, f.K, np.round(f.depth * 1000) / 1000)  # what survives 16UC1
            assert_pose_close(pose_matrix(peer.poses[stamp].pose), rgbd.T_map_cam)
        diag = peer.fresh_diag()
        assert int(diag['frames_with_depth']) == int(before['frames_with_depth']) + len(frames)
        assert diag['frames_without_depth'] == before['frames_without_depth']


def test_best_effort_camera_info_per_frame(peer, setup, tmp_path_factory):
    """CameraInfo published best effort with every frame (volatile), the other common way, still reaches the node."""
    best_effort = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
    info_pub = peer.node.create_publisher(CameraInfo, '/camera/camera_info', best_effort)
    node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', 'diagnostics_period:=0.1', *PERMISSIVE],
                      tmp_path_factory.mktemp('node_best_effort') / 'node.log')
    try:
        assert peer.wait(lambda: info_pub.get_subscription_count() > 0, 10)
        lz = offline(setup['model'])
        for f in setup['frames'][:5]:
            info = camera_info_msg(f.K, f.image.shape[1], f.image.shape[0])
            info.header.stamp, info.header.frame_id = Time(nanoseconds=f.stamp_ns).to_msg(), f.frame_id
            info_pub.publish(info)
            stamp = peer.send(f, info=False)
            if not peer.wait(lambda: stamp in peer.poses, 3):  # best effort: a lost CameraInfo is allowed once
                info_pub.publish(info)
                stamp = peer.send(f, stamp_ns=f.stamp_ns + 1, info=False)
                assert peer.wait(lambda: stamp in peer.poses, 10), f'{peer.diag}\n{node.output()}'
            assert_pose_close(pose_matrix(peer.poses[stamp].pose), lz.localize(f.image, f.K).T_map_cam)
    finally:
        assert node.stop() == 0, node.output()
        peer.node.destroy_publisher(info_pub)


class TestTracking:
    """With a map, the last published pose is the next frame's prior (as it was: no odometry in tf2): with a
    one-shot gate that refuses every pose, a robot standing still (the same view, new stamps; the tiny scene's
    frames are a twenty-fourth of a loop apart) is recovered once, then tracked from the prior, over DDS, as the
    offline Localizer does given the same prior; /globloc/relocalize forgets the prior."""

    @pytest.fixture(scope='class')
    def node(self, peer, setup, map_path, tmp_path_factory):
        log = tmp_path_factory.mktemp('node_tracking') / 'node.log'
        node = start_node(peer, ['-p', f'model:={setup["model"]}', '-p', f'place_map:={map_path}', '-p', 'qos:=reliable',
                                 '-p', 'diagnostics_period:=0.1', '-p', 'prior_timeout:=100.0',
                                 '-p', 'max_residual_m:=1e-9'], log)
        yield node
        assert node.stop() == 0, node.output()

    def _run(self, peer, node, lz, frames, offset_ns: int, prior=None) -> list[str]:
        from globloc_ros.node import PRIOR_COVARIANCE
        paths = []
        for f in frames:
            stamp = f.stamp_ns + offset_ns
            ref = lz.localize(f.image, f.K, None, prior=prior)
            rejected = int(peer.fresh_diag()['frames_rejected'])
            peer.send(f, stamp_ns=stamp)
            paths.append(ref.path)
            if not ref.confident:
                assert peer.wait(lambda: int(peer.diag['frames_rejected']) > rejected, 10), node.output()
                continue
            assert peer.wait(lambda: stamp in peer.poses_cov, 10), node.output()
            with peer.lock:
                msg = peer.poses_cov[stamp]
            assert_pose_close(pose_matrix(msg.pose.pose), ref.T_map_cam)
            prior = (ref.T_map_cam, ref.covariance + PRIOR_COVARIANCE)
        return paths

    def test_frames_after_a_recovery_are_tracked_from_the_last_pose(self, node, peer, setup, map_path):
        from globloc_ros.runtime import Localizer
        lz = Localizer(setup['model'], place_map=map_path, max_residual_m=1e-9)
        before = {p: int(peer.fresh_diag()[f'frames_{p}']) for p in ('refined', 'tracked', 'recovered')}
        still = [dataclasses.replace(setup['frames'][0], stamp_ns=setup['frames'][0].stamp_ns + k * 33_000_000)
                 for k in range(4)]
        paths = self._run(peer, node, lz, still, 80_000_000_000)
        assert paths == ['recovered', 'tracked', 'tracked', 'tracked'], paths
        diag = peer.fresh_diag()
        assert {p: int(diag[f'frames_{p}']) - before[p] for p in before} == \
            {p: paths.count(p) for p in before}, (diag, paths)
        # /globloc/relocalize: the robot may have been carried off; the next frame is searched for, not tracked.
        assert peer.relocalize.wait_for_service(timeout_sec=10)
        future = peer.relocalize.call_async(Trigger.Request())
        assert peer.wait(future.done, 10) and future.result().success
        before = {p: int(peer.fresh_diag()[f'frames_{p}']) for p in ('tracked', 'recovered')}
        assert self._run(peer, node, lz, still[:1], 90_000_000_000) == ['recovered']
        diag = peer.fresh_diag()
        assert int(diag['frames_tracked']) == before['tracked']
        assert int(diag['frames_recovered']) == before['recovered'] + 1
