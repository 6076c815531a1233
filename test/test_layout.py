"""Package layout rules: the core and the offline package never import rclpy; package.xml and the pip metadata declare
what the code imports; executables and files go where ament and pip users look for them."""
import ast
import configparser
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ['globloc_ros.frames', 'globloc_ros.align', 'globloc_ros.net', 'globloc_ros.modelfile',
        'globloc_ros.runtime', 'globloc_ros.imgmsg']


def test_core_and_offline_package_never_import_rclpy():
    offline = sorted('globloc.' + p.stem for p in (ROOT / 'globloc').glob('*.py') if p.stem != '__main__')
    code = ('import importlib, sys\n'
            f'for m in {CORE + offline!r}: importlib.import_module(m)\n'
            "print('rclpy' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == 'False', out.stdout + out.stderr


PKG = ROOT / 'ros' / 'globloc_ros'  # the ament_python package colcon builds (its sources are links to ROOT)
# What the code imports -> how package.xml declares it (rosdep keys) and the PyPI name (pyproject, requirements.txt).
ROSDEP = {'numpy': 'python3-numpy', 'scipy': 'python3-scipy', 'cv2': 'python3-opencv', 'torch': 'python3-torch',
          'transforms3d': 'python3-transforms3d', 'matplotlib': 'python3-matplotlib', 'tqdm': 'python3-tqdm',
          'skimage': 'python3-skimage'}
PIP_ONLY = ('onnx', 'onnxruntime', 'onnxscript', 'roma', 'rosbags')  # no rosdep key: a comment in package.xml
OPTIONAL = ('tensorrt',)  # imported only with backend:=tensorrt
PYPI = {'cv2': 'opencv-python-headless', 'skimage': 'scikit-image'}


def _imports() -> set[str]:
    """Top-level modules imported anywhere in globloc/, globloc_ros/ and launch/, less the standard library."""
    names = set()
    for path in [*(ROOT / 'globloc').glob('*.py'), *(ROOT / 'globloc_ros').glob('*.py'), *(ROOT / 'launch').glob('*.py')]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split('.')[0])
    return names - set(sys.stdlib_module_names) - {'__future__', 'globloc', 'globloc_ros'}


def test_package_xml_declares_what_the_code_imports():
    pkg = ET.parse(PKG / 'package.xml').getroot()
    assert pkg.get('format') == '3' and pkg.findtext('name') == 'globloc_ros'
    assert pkg.find('export/build_type').text == 'ament_python'
    deps = {e.text for e in pkg.findall('exec_depend')}
    comments = (PKG / 'package.xml').read_text()
    imported = _imports()
    assert {'rclpy', 'numpy', 'torch', 'scipy', 'onnxruntime', 'rcl_interfaces', 'ament_index_python'} <= imported
    for module in sorted(imported):
        if module in ROSDEP:
            assert ROSDEP[module] in deps, f'{module}: no <exec_depend>{ROSDEP[module]}</exec_depend>'
        elif module in PIP_ONLY + OPTIONAL:
            assert module in comments, f'{module}: not named in package.xml\'s comment on pip-only dependencies'
        else:  # a ROS package: its module has its name
            assert module in deps, f'{module} is imported but package.xml has no <exec_depend>{module}</exec_depend>'
    assert {'tf2_msgs', 'globloc_msgs'} <= deps  # tf2_ros needs the first; the bags' /globloc/pose_graph type


def test_pip_requirements_list_what_the_code_imports():
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    pins = {line.split('==')[0].lower() for line in (ROOT / 'requirements.txt').read_text().splitlines()
            if '==' in line and not line.startswith('#')}
    declared = {d.lower() for d in project['dependencies']}
    for module in sorted(_imports() & (set(ROSDEP) | set(PIP_ONLY))):
        name = PYPI.get(module, module).lower()
        assert name in pins, f'{module}: requirements.txt has no {name}==<version>'
        assert name in declared, f'{module}: pyproject.toml does not list {name}'


def test_executables_go_to_lib_the_ament_python_way_and_the_commands_to_bin():
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    assert set(project['scripts']) == {'globloc', 'globloc-localizer', 'globloc-replay'}  # pip: bin/, no generic names
    cfg = configparser.ConfigParser()
    cfg.read(PKG / 'setup.cfg')
    assert cfg['develop']['script_dir'] == cfg['install']['install_scripts'] == '$base/lib/globloc_ros'
    setup = (PKG / 'setup.py').read_text()
    for piece in ("'localizer = globloc_ros.node:main'", "'replay = globloc_ros.replay:main'",
                  "'resource/' + package_name", "'launch/*.launch.py'", "'config/*.yaml'", "'models/*'"):
        assert piece in setup, piece
    launch = (ROOT / 'launch' / 'localize.launch.py').read_text()
    assert "Node(package='globloc_ros', executable='localizer'" in launch
    from globloc_ros import share
    assert set(share.EXECUTABLES) == {'localizer', 'replay'}  # the venv's lib/globloc_ros (make venv)


def test_colcon_packages_link_to_the_one_copy_of_each_file():
    # ros/globloc_ros holds package.xml, setup.py, setup.cfg and resource/; the rest are links to the repository root,
    # which stays no package itself, so colcon's crawl reaches ros/globloc_msgs too.
    for name in ('globloc', 'globloc_ros', 'launch', 'config', 'models'):
        assert (PKG / name).is_symlink() and (PKG / name).resolve() == (ROOT / name).resolve(), name
    assert (PKG / 'resource' / 'globloc_ros').is_file()
    assert not any((ROOT / f).exists() for f in ('package.xml', 'setup.py', 'setup.cfg', 'CMakeLists.txt'))
    # one PoseGraphEdge definition: globloc_msgs builds it, and the bag layer (globloc/bags.py) reads it through a link
    msg = ROOT / 'ros' / 'globloc_msgs' / 'msg' / 'PoseGraphEdge.msg'
    assert msg.is_file() and not msg.is_symlink()
    assert (ROOT / 'globloc' / 'msg' / 'PoseGraphEdge.msg').resolve() == msg.resolve()
    from globloc.bags import EDGE_MSG_FILE
    assert EDGE_MSG_FILE.resolve() == msg.resolve()
    msgs = ET.parse(ROOT / 'ros' / 'globloc_msgs' / 'package.xml').getroot()
    assert msgs.findtext('member_of_group') == 'rosidl_interface_packages'
    assert 'rosidl_generate_interfaces' in (ROOT / 'ros' / 'globloc_msgs' / 'CMakeLists.txt').read_text()
