"""Bag files and the topic names of the data contract (METHOD.md, section 5), shared by the offline package
(globloc.bags) and the node-side replay tool (globloc_ros.replay), so that the runtime never imports globloc."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STORAGE_SUFFIXES = ('.mcap', '.db3')


class BagError(RuntimeError):
    """A bag that cannot be read as the data contract; the message names file, topic and stamp."""


@dataclass(frozen=True)
class Topics:
    """Topic names of the data contract.

    Images come from `image` when the bag has it, else from `compressed`. `odometry`, when set, replaces
    `pose` by a nav_msgs/Odometry topic (its pose, T_map_cam of the optical frame, is used).
    """
    image: str = '/camera/image_raw'
    compressed: str = '/camera/image_raw/compressed'
    camera_info: str = '/camera/camera_info'
    depth: str = '/camera/depth/image_raw'
    pose: str = '/globloc/gt_pose'
    odometry: str | None = None
    landmarks: str = '/globloc/landmarks'
    graph: str = '/globloc/pose_graph'


def storage_files(folder: Path) -> list[Path]:
    """The rosbag2 storage files (.mcap, .db3) in a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix in STORAGE_SUFFIXES)


def bag_paths(paths: Iterable) -> list[Path]:
    """Expand bag folders, .mcap/.db3 files and folders of bag folders into bag paths (sorted per folder)."""
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise BagError(f'{p}: no such bag (file or folder does not exist)')
        if p.is_dir() and not (p / 'metadata.yaml').exists():
            inner = sorted(c for c in p.iterdir()
                           if c.is_dir() and ((c / 'metadata.yaml').exists() or storage_files(c)))
            if inner:
                out += inner
                continue
        out.append(p)
    return out
