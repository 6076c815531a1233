"""Start the globloc localizer (and optionally RViz and a bag replay).

    ros2 launch globloc_ros localize.launch.py model:=model.pt
    ros2 launch globloc_ros localize.launch.py model:=model.onnx publish_tf:=map_to_odom use_rviz:=true
    ros2 launch globloc_ros localize.launch.py model:=model.pt bag:=data/scene/seq_02 replay_rate:=0.5

Parameters come from params_file (default: this package's config/localizer.yaml); the arguments
below override it only when given (empty means: keep the params file's value). The whole launch
stops when the localizer exits; a bad model or parameter ends `ros2 launch` with its message and exit code 1.
"""
from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

SHARE = Path(get_package_share_directory('globloc_ros'))

# name, default, description; parameter overrides are the names that are also node parameters.
ARGUMENTS = (
    ('model', '', 'model file (.pt, .onnx) or TensorRT engine; empty: params_file, else the shipped model'),
    ('params_file', str(SHARE / 'config' / 'localizer.yaml'), 'node parameters (YAML)'),
    ('namespace', '', 'namespace of the node (outputs: /<namespace>/globloc/pose ...)'),
    ('image_topic', '', 'camera image topic; empty: params_file'),
    ('camera_info_topic', '', 'CameraInfo topic; empty: params_file'),
    ('depth_topic', '', 'RGB-D: registered depth image topic; empty: params_file (default: the image alone)'),
    ('place_map', '', 'map file (`globloc map`) to refine poses against; empty: params_file'),
    ('backend', '', 'auto | tensorrt | onnxruntime | torch; empty: params_file'),
    ('qos', '', 'sensor_data | reliable (camera subscriptions); empty: params_file'),
    ('publish_tf', '', 'none | map_to_camera | map_to_odom; empty: params_file'),
    ('use_rviz', 'false', 'start rviz2 with config/globloc.rviz'),
    ('bag', '', 'optional: replay this bag (globloc-replay) into the node'),
    ('replay_rate', '1.0', 'with bag: recorded rate times this'),
)
OVERRIDES = ('model', 'image_topic', 'camera_info_topic', 'depth_topic', 'place_map', 'backend', 'qos', 'publish_tf')


def _on_localizer_exit(event, _context):
    """Stop the launch with the localizer. An exception is how launch fails `ros2 launch` (exit code 1), so a
    localizer that failed (bad model or parameter: exit code 2) fails the launch too."""
    if event.returncode:
        raise RuntimeError(f'the localizer exited with code {event.returncode} (its message is above)')
    return [EmitEvent(event=Shutdown(reason='the localizer exited'))]


def _actions(context):
    arg = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    overrides = {name: arg[name] for name in OVERRIDES if arg[name]}
    localizer = Node(package='globloc_ros', executable='localizer', name='globloc', namespace=arg['namespace'],
                     parameters=[arg['params_file'], overrides], output='screen', emulate_tty=True)
    actions = [localizer,
               RegisterEventHandler(OnProcessExit(target_action=localizer, on_exit=_on_localizer_exit))]
    if arg['use_rviz'].lower() in ('true', '1', 'yes'):
        try:
            get_package_share_directory('rviz2')
            actions.append(Node(package='rviz2', executable='rviz2', name='rviz2', output='screen',
                                arguments=['-d', str(SHARE / 'config' / 'globloc.rviz')]))
        except PackageNotFoundError:  # a headless robot or the venv: the localizer runs all the same
            actions.append(LogInfo(msg="use_rviz: rviz2 is not installed (no package 'rviz2'): running without RViz"))
    if arg['bag']:
        actions.append(Node(package='globloc_ros', executable='replay', name='globloc_replay', output='screen',
                            arguments=[arg['bag'], '--rate', arg['replay_rate']]))
    return actions


def generate_launch_description():
    return LaunchDescription([DeclareLaunchArgument(name, default_value=default, description=text)
                              for name, default, text in ARGUMENTS] + [OpaqueFunction(function=_actions)])
