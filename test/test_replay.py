"""globloc-replay over real DDS: every colour and depth image of a real RGB-D bag reaches a best-effort
subscriber, the QoS of the node's camera subscriptions by default."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from globloc.bags import Topics
from globloc_ros import replay

REPLAY = Path(sys.executable).parent / 'globloc-replay'
REPO = Path(__file__).resolve().parents[1]


def _received(bag: Path, profile: Path | None = None) -> Counter:
    """Replay `bag` (compressed image, CameraInfo, depth) at 30 frames/s; count what a best-effort subscriber in
    this process receives. profile: the replay's FASTDDS_DEFAULT_PROFILES_FILE (None: the replay's own choice)."""
    domain = random.SystemRandom().randint(100, 199)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node('replay_probe', context=ctx)
    counts: Counter = Counter()
    for cls, topic in ((CompressedImage, Topics.compressed), (Image, Topics.depth)):
        node.create_subscription(cls, topic, lambda _msg, t=topic: counts.update([t]), qos_profile_sensor_data)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    env = {k: v for k, v in os.environ.items() if k not in ('FASTDDS_DEFAULT_PROFILES_FILE',
                                                            'FASTRTPS_DEFAULT_PROFILES_FILE')}
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    if profile is not None:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(profile)
    try:
        subprocess.run([str(REPLAY), str(bag), '--rate-hz', '30', '--topics', Topics.compressed,
                        Topics.camera_info, Topics.depth], env=env, check=True, capture_output=True, timeout=120)
        time.sleep(1.0)  # the last messages are still in flight
    finally:
        executor.shutdown()
        spinner.join(timeout=5.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    return counts


def test_best_effort_subscriber_gets_every_rgbd_frame(real_bags, tmp_path):
    """SUN3D: 50 frames of 640x480 jpeg + 16UC1 depth (614 KB). With config/fastdds_large_data.xml, which the
    replay picks by itself, all arrive; with Fast DDS's built-in defaults (512 KB shared-memory segment) depth
    images are lost before any subscriber sees them, which is why the profile exists."""
    bag = real_bags / 'sun3d_frag1'
    assert _received(bag) == {Topics.compressed: 50, Topics.depth: 50}
    plain = tmp_path / 'plain.xml'
    plain.write_text('<?xml version="1.0"?><dds xmlns="http://www.eprosima.com"><profiles><participant '
                     'profile_name="plain" is_default_profile="true"><rtps/></participant></profiles></dds>')
    assert _received(bag, plain)[Topics.depth] < 50


def test_replay_picks_the_profile_unless_told_otherwise(monkeypatch):
    """Without any ROS environment (AMENT_PREFIX_PATH unset) the source tree's profile is used; a profile or an
    RMW named in the environment is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in (
        'AMENT_PREFIX_PATH', 'FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE', 'RMW_IMPLEMENTATION')}
    monkeypatch.setattr(os, 'environ', env)  # what the function sets stays in this test
    profile = REPO / 'config' / replay.LARGE_DATA_PROFILE
    assert replay.use_large_data_profile() == profile and env['FASTDDS_DEFAULT_PROFILES_FILE'] == str(profile)
    env['FASTDDS_DEFAULT_PROFILES_FILE'] = '/mine.xml'
    assert replay.use_large_data_profile() is None and env['FASTDDS_DEFAULT_PROFILES_FILE'] == '/mine.xml'
    del env['FASTDDS_DEFAULT_PROFILES_FILE']
    env['RMW_IMPLEMENTATION'] = 'rmw_cyclonedds_cpp'
    assert replay.use_large_data_profile() is None and 'FASTDDS_DEFAULT_PROFILES_FILE' not in env
