"""The model file: weights plus everything needed to use them, in one torch.save'd dict.

Layout (FORMAT_VERSION 1):
  {'format': 'globloc-model', 'version': 1, 'config': NetConfig.to_dict(),
   'state_dict': {...}, 'meta': {training command, steps, data, metrics, torch version, ...}}
Loading checks each part and raises ModelFileError naming the file and what is wrong.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch

from globloc_ros.atomic import atomic_write
from globloc_ros.net import GlobLocNet, NetConfig

FORMAT = 'globloc-model'
FORMAT_VERSION = 1


class ModelFileError(RuntimeError):
    """A model file that is missing, truncated, foreign or incompatible."""


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(net: GlobLocNet, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write `net` (weights on CPU) and its config + `meta` atomically to `path`."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save({'format': FORMAT, 'version': FORMAT_VERSION, 'config': net.config.to_dict(),
                       'state_dict': state, 'meta': dict(meta or {})}, path)


def read_model_dict(path: str | os.PathLike) -> dict:
    """Load and validate the raw dict of a model file (no network built)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f'model file not found: {path}')
    try:
        with warnings.catch_warnings():  # a foreign pickle's warning would come before the one-line error
            warnings.simplefilter('ignore', UserWarning)
            d = torch.load(path, map_location='cpu', weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = str(e).strip().split('\n')[0]
        raise ModelFileError(f'{path}: not a readable model file (truncated or corrupt?): {first_line}') from e
    except Exception as e:  # pickle errors of foreign files come in many types, with pages of advice
        raise ModelFileError(f'{path}: not a globloc model file (torch.load: {type(e).__name__})') from e
    if not isinstance(d, dict) or d.get('format') != FORMAT:
        raise ModelFileError(f"{path}: not a globloc model file (no 'format': '{FORMAT}' entry)")
    if d.get('version') != FORMAT_VERSION:
        raise ModelFileError(f'{path}: model format version {d.get("version")} is not supported '
                             f'(this build reads version {FORMAT_VERSION}); re-export or retrain')
    for key in ('config', 'state_dict', 'meta'):
        if key not in d:
            raise ModelFileError(f"{path}: model file lacks its '{key}' entry")
    return d


def load_model(path: str | os.PathLike) -> tuple[GlobLocNet, dict]:
    """Model file -> (GlobLocNet in eval mode on CPU, meta dict)."""
    d = read_model_dict(path)
    try:
        net = GlobLocNet(NetConfig.from_dict(d['config']))
        net.load_state_dict(d['state_dict'])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise ModelFileError(f'{path}: weights or config do not fit this network: {e}') from e
    return net.eval(), d['meta']
