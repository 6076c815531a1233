"""Files this package installs into share/globloc_ros (models/, config/), found without ROS tooling."""
from __future__ import annotations

from pathlib import Path

PACKAGE = 'globloc_ros'


def share_file(relative: str) -> tuple[Path | None, list[Path]]:
    """share/globloc_ros/<relative> of the installed package (ament index), else <relative> in the source tree
    (editable installs are not in the ament index). Returns (the first that exists or None, the paths tried)."""
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
