"""Files this package installs into share/globloc_ros (models/, config/), found without ROS tooling; and the ament
layout of an editable install (`python -m globloc_ros.share PREFIX`, run by `make venv`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = 'globloc_ros'


def share_file(relative: str) -> tuple[Path | None, list[Path]]:
    """share/globloc_ros/<relative> of the installed package (ament index), else <relative> in the source tree
    (a pip install has no ament layout; `make venv` gives its editable one link_prefix's). Returns (the first that
    exists or None, the paths tried)."""
    tried = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            tried.append(Path(get_package_share_directory(PACKAGE)) / relative)
        except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset (no ROS environment)
            pass
    except ImportError:
        pass
    tried.append(Path(__file__).resolve().parents[1] / relative)
    return next((p for p in tried if p.is_file()), None), tried


# ---- the ament layout of an editable install ------------------------------------------------------------------
SOURCE = Path(__file__).resolve().parents[1]  # the checkout, for an editable install
SHARE_DIRS = ('launch', 'config', 'models')  # share/globloc_ros/<dir>: what ros/globloc_ros/setup.py installs
# lib/globloc_ros/<name> -> bin/<script>: the executables ros/globloc_ros/setup.py installs
EXECUTABLES = {'globloc': 'globloc', 'localizer': 'globloc-localizer', 'replay': 'globloc-replay'}


def link_prefix(prefix: Path, source: Path = SOURCE) -> Path:
    """Make `prefix` (a venv) an ament prefix of globloc_ros made of symlinks into the checkout `source`, as
    `colcon build --symlink-install` does, so that `ros2 launch/run/pkg` find the package of an editable install
    (`pip install -e` installs no data files) and edits in the checkout need no reinstall:

        share/ament_index/resource_index/packages/globloc_ros     the marker
        share/globloc_ros/package.xml, share/globloc_ros/{launch,config,models}/<file>
        lib/globloc_ros/{globloc,localizer,replay} -> bin/globloc{,-localizer,-replay} (the install's console scripts)

    Folders are real and their files links (ros2 launch finds launch files with os.walk, which does not follow
    linked folders). Links of files no longer in the checkout are removed; links that are right are left alone,
    so a node started from this prefix meanwhile is not disturbed. Returns prefix."""
    prefix, pkg_dir = Path(prefix).absolute(), source / 'ros' / PACKAGE
    share, lib = prefix / 'share' / PACKAGE, prefix / 'lib' / PACKAGE
    links = {prefix / 'share/ament_index/resource_index/packages' / PACKAGE: pkg_dir / 'resource' / PACKAGE,
             share / 'package.xml': pkg_dir / 'package.xml'}
    for name in SHARE_DIRS:
        if (share / name).is_symlink():  # a linked folder (see above): replaced by a real one
            (share / name).unlink()
        for src in sorted((source / name).iterdir()):
            if src.is_file() and src.suffix != '.ckpt':  # training checkpoints are not installed (setup.py)
                links[share / name / src.name] = src
    for name, script in EXECUTABLES.items():
        links[lib / name] = Path('../../bin') / script  # relative: the venv may move with its checkout
    for old in [p for folder in (share, lib) if folder.is_dir() for p in folder.rglob('*')]:
        if old not in links and (old.is_symlink() or old.is_file()):
            old.unlink()
    for dst, src in links.items():
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + '.tmp')
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(src)
        os.replace(tmp, dst)  # atomic: the package never looks missing
    return prefix


def main(argv: list[str] | None = None) -> int:
    """python -m globloc_ros.share PREFIX: link_prefix(PREFIX) (the Makefile's venv step)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print('usage: python -m globloc_ros.share PREFIX   (an ament prefix of symlinks into this checkout)',
              file=sys.stderr)
        return 2
    prefix = link_prefix(Path(args[0]))
    print(f'ament layout of {PACKAGE} in {prefix}: share/{PACKAGE}, lib/{PACKAGE} -> {SOURCE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
