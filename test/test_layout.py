"""Package layout rules: the core and the offline package never import rclpy; the ament layout is complete."""
import subprocess
import sys
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


def test_package_xml_and_data_files():
    pkg = ET.parse(ROOT / 'package.xml').getroot()
    assert pkg.get('format') == '3' and pkg.findtext('name') == 'globloc_ros'
    assert pkg.find('export/build_type').text == 'ament_python'
    deps = {e.text for e in pkg.findall('exec_depend')}
    assert {'rclpy', 'sensor_msgs', 'geometry_msgs', 'nav_msgs', 'std_srvs', 'diagnostic_msgs',
            'tf2_ros', 'tf2_msgs'} <= deps
    setup = (ROOT / 'setup.py').read_text()
    for piece in ("'resource/' + package_name", "'launch/*.launch.py'", "'config/*.yaml'", "'models/*'",
                  "'scripts/localizer'", 'globloc-localizer =', 'globloc-replay =', 'globloc ='):
        assert piece in setup, piece
    assert (ROOT / 'resource' / 'globloc_ros').is_file()
    assert (ROOT / 'launch' / 'localize.launch.py').is_file() and (ROOT / 'config' / 'localizer.yaml').is_file()
