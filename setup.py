"""ament_python package globloc_ros: the node and its core (globloc_ros/) and the offline
training package (globloc/). Builds with `colcon build` and installs with pip."""
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
        # launch_ros runs <prefix>/lib/<pkg>/<executable>; pip puts console scripts in bin/.
        ('lib/' + package_name, ['scripts/localizer', 'scripts/replay']),
    ],
    install_requires=['setuptools'],
    python_requires='>=3.10',
    zip_safe=True,
    maintainer='globloc_ros developers',
    description='Single-image camera relocalization node for ROS 2 (arXiv 2312.00500).',
    license='BSD-3-Clause',
    entry_points={'console_scripts': [
        'localizer = globloc_ros.node:main',
        'replay = globloc_ros.replay:main',
        'globloc-localizer = globloc_ros.node:main',
        'globloc-replay = globloc_ros.replay:main',
        'globloc = globloc.cli:main',
    ]},
)
