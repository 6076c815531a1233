"""Package layout rules: the core and the offline package never import rclpy, the runtime never imports the
offline package, no import cycles, a map loads without torch; package.xml and the pip metadata declare what the code
imports; executables and files go where ament and pip users look for them."""
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


# ---- one import direction ---------------------------------------------------------------------------------
# What each module of globloc/ and globloc_ros/ imports, read from its source (function-level imports included,
# `if TYPE_CHECKING:` blocks left out: they never run).
# The node side, the only modules that import rclpy: node.py is the rclpy shell around the runtime; replay.py
# publishes a bag over DDS (globloc-replay); listen.py records what the node publishes (for `make demo`, whose
# globloc.demo starts it as a process).
NODE_SIDE = {'globloc_ros.node', 'globloc_ros.replay', 'globloc_ros.listen'}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (getattr(node.test, 'id', None) == 'TYPE_CHECKING'
                                         or getattr(node.test, 'attr', None) == 'TYPE_CHECKING')


def _imported_names(tree: ast.AST) -> set[str]:
    """Dotted names a module imports: 'a.b' for `import a.b`, and 'a.b' and 'a.b.c' for `from a.b import c`."""
    names = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, 'relative import'  # the rules below read absolute names
            names.add(node.module)
            names |= {f'{node.module}.{a.name}' for a in node.names}
        todo += ast.iter_child_nodes(node)
    return names


def _modules() -> dict[str, set[str]]:
    """'globloc_ros.runtime' -> every dotted name it imports, for each module of both packages."""
    out = {}
    for package in ('globloc', 'globloc_ros'):
        for path in sorted((ROOT / package).glob('*.py')):
            name = package if path.stem == '__init__' else f'{package}.{path.stem}'
            out[name] = _imported_names(ast.parse(path.read_text(), str(path)))
    return out


def import_graph() -> dict[str, list[str]]:
    """Module -> the modules of both packages it imports (itself and package __init__s left out)."""
    modules = _modules()
    return {m: sorted({n for n in names if n in modules and n not in ('globloc', 'globloc_ros', m)})
            for m, names in modules.items()}


def test_the_runtime_never_imports_the_offline_package():
    offending = {m for m, names in _modules().items() if m.startswith('globloc_ros')
                 and any(n == 'globloc' or n.startswith('globloc.') for n in names)}
    assert not offending, f'globloc_ros modules importing globloc: {sorted(offending)}'


def test_only_the_node_side_imports_rclpy():
    ros = ('rclpy', 'tf2_ros', 'launch', 'launch_ros')
    importers = {m for m, names in _modules().items()
                 if any(n.split('.')[0] in ros or n.split('.')[0].endswith(('_msgs', '_srvs')) for n in names)}
    assert importers == NODE_SIDE, f'modules importing rclpy or ROS messages: {sorted(importers)}'


def test_no_import_cycles():
    graph = import_graph()
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 'open'
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 'open':
                cycles.append(' -> '.join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 'done'

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, 'import cycles: ' + '; '.join(cycles)
    assert 'globloc.bags' in graph['globloc.dataset'] and 'globloc_ros.onnx_export' in graph['globloc_ros.runtime']


def test_no_test_module_imports_another():
    # shared fixtures live in conftest.py, shared helpers in modules not named test_* (ros_helpers.py)
    imports = {path.name: _imported_names(ast.parse(path.read_text())) for path in (ROOT / 'test').glob('*.py')}
    offending = {name: sorted(n for n in names if n.startswith('test_')) for name, names in imports.items()}
    assert not any(offending.values()), {name: names for name, names in offending.items() if names}


def test_loading_a_map_needs_no_torch():
    code = 'import sys, globloc_ros.placemap; print(sorted(m for m in ("torch", "globloc") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == '[]', out.stdout + out.stderr


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
    # A ROS 2 workspace installs requirements.txt as it is: no ROS 2 wheel there to shadow the distro's own.
    assert not [p for p in pins if p.startswith('ros-')], pins
    ros = (ROOT / 'requirements-ros.txt').read_text()
    assert 'ros-rclpy==' in ros and '-r requirements-ros.txt' in (ROOT / 'requirements-dev.txt').read_text()


def test_executables_go_to_lib_the_ament_python_way_and_the_commands_to_bin():
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    assert set(project['scripts']) == {'globloc', 'globloc-localizer', 'globloc-replay'}  # pip: bin/, no generic names
    cfg = configparser.ConfigParser()
    cfg.read(PKG / 'setup.cfg')
    assert cfg['develop']['script_dir'] == cfg['install']['install_scripts'] == '$base/lib/globloc_ros'
    setup = (PKG / 'setup.py').read_text()
    for piece in ("'localizer = globloc_ros.node:main'", "'replay = globloc_ros.replay:main'",
                  "'globloc = globloc.cli:main'",
                  "'resource/' + package_name", "'launch/*.launch.py'", "'config/*.yaml'", "'models/*'"):
        assert piece in setup, piece
    launch = (ROOT / 'launch' / 'localize.launch.py').read_text()
    assert "Node(package='globloc_ros', executable='localizer'" in launch
    from globloc_ros import share
    assert set(share.EXECUTABLES) == {'globloc', 'localizer', 'replay'}  # the venv's lib/globloc_ros (make venv)


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
