"""`ros2 run PACKAGE EXECUTABLE [ARGS]` and `ros2 interface show TYPE` for a venv without ros2run and
ros2interface (neither is on PyPI nor in ../shared/ros-overlay). They find what the real verbs find, through the
ament index: the executable of that name in PREFIX/lib/PACKAGE (ros2pkg.api), and the definition file in
PREFIX/share/PACKAGE/msg (rosidl_runtime_py). Written to ros2cli's command extension API; `make venv` installs
this package only where both real ones are missing."""
from __future__ import annotations

import argparse
import os
import re
import shlex

from ros2cli.command import CommandExtension
from ros2pkg.api import PackageNotFound, get_executable_paths, package_name_completer
from rosidl_runtime_py import get_interface_path

PRIMITIVES = {'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32',
              'int64', 'uint64', 'string', 'wstring'}


class RunCommand(CommandExtension):
    """Run a package specific executable"""

    def add_arguments(self, parser, cli_name, *, argv=None):
        parser.add_argument('--prefix', help='Prefix command before the executable, e.g. "gdb -ex run --args"')
        arg = parser.add_argument('package_name', help='Name of the ROS package')
        arg.completer = package_name_completer
        parser.add_argument('executable_name', help='Name of the executable')
        parser.add_argument('argv', nargs=argparse.REMAINDER, help='Arguments passed to the executable')

    def main(self, *, parser, args):
        try:
            paths = get_executable_paths(package_name=args.package_name)
        except PackageNotFound:
            return f"Package '{args.package_name}' not found"
        paths = [p for p in paths if os.path.basename(p) == args.executable_name]
        if len(paths) != 1:
            return 'No executable found' if not paths else f'Multiple executables found: {", ".join(paths)}'
        cmd = [*shlex.split(args.prefix or ''), paths[0], *args.argv]
        os.execvp(cmd[0], cmd)  # the executable takes this process over: signals reach it as they would


class InterfaceCommand(CommandExtension):
    """Show information about ROS interfaces"""

    def add_arguments(self, parser, cli_name, *, argv=None):
        verbs = parser.add_subparsers(dest='verb', required=True, metavar='Call `ros2 interface <command> -h`')
        show = verbs.add_parser('show', help='Output the interface definition')
        show.add_argument('type', help="Interface type, e.g. 'globloc_msgs/msg/PoseGraphEdge'")

    def main(self, *, parser, args):
        try:
            print(show_interface(args.type), end='')
        except (LookupError, ValueError) as e:
            return str(e)


def show_interface(name: str, indent: str = '') -> str:
    """The definition of `name` ('pkg/msg/Type'; 'pkg/Type' means a message) as `ros2 interface show` prints it:
    the file as written, each field of a message type followed by that type's definition indented by a tab
    (without its comments and blank lines), recursively."""
    if name.count('/') == 1:
        name = name.replace('/', '/msg/')
    package = name.split('/')[0]
    with open(get_interface_path(name), encoding='utf-8') as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        code = line.split('#', 1)[0].strip()
        if indent and not code:  # nested definitions: no comments, no blank lines
            continue
        out.append(indent + (code if indent else line) + '\n')
        if not code or '=' in code:  # a comment, a blank line or a constant (constants are primitive)
            continue
        field_type = re.split(r'[\[<]', code.split()[0])[0]  # without array and string bounds
        if field_type in PRIMITIVES:
            continue
        if field_type == 'Header':
            field_type = 'std_msgs/Header'
        if '/' not in field_type:
            field_type = f'{package}/{field_type}'
        out.append(show_interface(field_type, indent + '\t'))
    return ''.join(out)
