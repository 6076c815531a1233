"""`make demo`'s pipeline end to end on the tiny scene: node over DDS, poses back, report and plots written."""
import json
import os
import random
import subprocess
import sys

import pytest


@pytest.mark.parametrize('depth', [False, True], ids=['rgb', 'rgbd'])
def test_demo_pipeline_through_the_node(tiny_model, tmp_path, depth):
    model, scene = tiny_model
    out = tmp_path / 'demo'
    # the tiny model is decimetre-accurate: loosen the gate so that its poses are published
    params = tmp_path / 'params.yaml'
    params.write_text('/**:\n  ros__parameters:\n    max_residual_m: 10.0\n    min_effective_points: 1.0\n')
    env = dict(os.environ, ROS_DOMAIN_ID=str(random.randint(100, 199)), ROS_LOG_DIR=str(tmp_path / 'log'))
    proc = subprocess.run([sys.executable, '-m', 'globloc.demo', '--scene', str(scene), '--model', str(model),
                           '--out', str(out), '--rate', '20', '--params-file', str(params), *(['--depth'] * depth)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / 'demo_report.json').read_text())
    assert report['frames'] == 24
    # Only poses the map verifies go out: the tiny model's are decimetres off, and the 160x120 images of the tiny
    # scene give few features to refine with, so about half.
    assert report['poses_published'] >= 6, report
    assert report['poses_published'] + int(report['rejected']) + int(report['dropped']) >= 22
    assert report['poses_published'] == sum(int(report[f'frames_{p}']) for p in ('refined', 'tracked', 'recovered'))
    assert 'recovered by searching the map' in proc.stdout
    assert report['mean_translation_m_ok'] < 0.1, report  # what the map verified is centimetres off
    if depth:  # the replay sent each frame's depth image with it; each frame the node took (not dropped) used it
        assert int(report['frames_with_depth']) + int(report['dropped']) >= 22
        assert int(report['diagnostics']['frames_without_depth']) == 0
        assert 'localized with their depth image' in proc.stdout
    for name in ('trajectory.png', 'error_cdf.png', 'error_over_index.png'):
        assert (out / name).stat().st_size > 10_000
    assert 'poses published' in proc.stdout and 'median translation error' in proc.stdout
    # no process of the demo outlives it
    left = subprocess.run(['pgrep', '-f', str(model)], capture_output=True, text=True).stdout.split()
    assert not left, left


def test_demo_fails_clearly_without_a_model(tiny_scene, tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'globloc.demo', '--scene', str(tiny_scene),
                           '--model', str(tmp_path / 'nope.pt'), '--out', str(tmp_path / 'demo')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert 'model not found' in proc.stderr and 'nope.pt' in proc.stderr


def test_demo_rebuilds_a_map_from_before_version_3_and_reuses_a_current_one(tiny_scene, tmp_path):
    import dataclasses

    import numpy as np

    from globloc import demo
    from globloc_ros import placemap as pm

    bags = [tiny_scene / 'seq_00', tiny_scene / 'seq_01']
    path = demo.ensure_map(tmp_path, bags)  # absent: built
    current = pm.load_map(path)
    assert len(current.keyframe_features_start) == len(current.keyframe_poses) + 1 > 1
    pm.save_map(dataclasses.replace(current, keyframe_features=np.zeros(0, np.int32),
                                    keyframe_features_start=np.zeros(0, np.int64)), path)  # saved as version 2
    assert len(pm.load_map(path).keyframe_features_start) == 0
    demo.ensure_map(tmp_path, bags)
    rebuilt = pm.load_map(path)
    assert np.array_equal(rebuilt.keyframe_features, current.keyframe_features)
    stamp = path.stat().st_mtime_ns
    demo.ensure_map(tmp_path, bags)
    assert path.stat().st_mtime_ns == stamp  # current: reused
