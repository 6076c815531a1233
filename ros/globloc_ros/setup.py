"""The ament_python package globloc_ros, for colcon: `colcon build --symlink-install` in a workspace with this
repository in src/ (colcon finds this folder and ../globloc_msgs). The Python packages globloc_ros (the node and
its core) and globloc (the offline package), launch/, config/ and models/ are symlinks to the repository root,
where pip installs them from (pyproject.toml). setup.cfg puts the executables into lib/globloc_ros, where
`ros2 run` and launch_ros's Node(package='globloc_ros', executable='localizer') look."""
from glob import glob

from setuptools import setup

package_name = 'globloc_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=['globloc_ros', 'globloc'],
    package_data={'globloc': ['msg/*.msg']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.rviz') + glob('config/*.xml')),
        ('share/' + package_name + '/models', [f for f in glob('models/*') if not f.endswith('.ckpt')]),
    ],
    # The Python requirements are the exec_depends of package.xml (rosdep) and, pip-only, requirements.txt.
    install_requires=['setuptools'],
    python_requires='>=3.10',
    zip_safe=True,
    maintainer='globloc_ros developers',
    maintainer_email='dev@globloc.invalid',
    description='Single-image camera relocalization node for ROS 2 (arXiv 2312.00500).',
    license='BSD-3-Clause',
    entry_points={'console_scripts': [
        'localizer = globloc_ros.node:main',  # ros2 run globloc_ros localizer
        'replay = globloc_ros.replay:main',  # ros2 run globloc_ros replay BAG
        'globloc = globloc.cli:main',  # ros2 run globloc_ros globloc train|map|eval ...
    ]},
)
