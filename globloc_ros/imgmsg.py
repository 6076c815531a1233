"""Camera messages -> numpy: our own small cv_bridge (cv_bridge is not available as a wheel).

Works on anything shaped like sensor_msgs Image / CompressedImage / CameraInfo (rclpy messages,
rosbags messages), and never imports rclpy. Every check raises ValueError naming the message field
that is wrong, so the node can log it once and show it in /diagnostics.

    rgb = image_to_rgb(msg)                  # (H, W, 3) uint8 RGB, a view into msg.data for rgb8
    rgb = compressed_to_rgb(msg)             # jpeg / png through cv2.imdecode
    depth = depth_to_metres(msg)             # 32FC1 metres / 16UC1 millimetres -> (H, W) float32 m, NaN = none
    cam = Intrinsics.from_camera_info(info)  # K (3, 3) float64 pixels, size (W, H), distortion
    rgb = cam.rectify(rgb)                   # undistorts when CameraInfo.d is non-zero, else a no-op
    depth = cam.rectify(depth, nearest=True) # the same for a depth image registered to it
    check_size(rgb, cam)                     # image size must equal CameraInfo width/height
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

IMAGE_ENCODINGS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1}  # encoding -> channels
DEPTH_ENCODINGS = {'32FC1': np.float32, '16UC1': np.uint16}  # metres, millimetres (REP-118)
COMPRESSED_FORMATS = ('jpeg', 'jpg', 'png')
DISTORTION_MODELS = ('plumb_bob', 'rational_polynomial')  # what cv2.initUndistortRectifyMap handles


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, mono8) -> (H, W, 3) uint8 RGB.

    rgb8 with step == 3W comes back as a read-only view of msg.data (no copy); bgr8 and mono8 are
    converted. Raises ValueError naming the field: encoding, width/height, is_bigendian, step, data.
    """
    enc = str(msg.encoding)
    if enc not in IMAGE_ENCODINGS:
        raise ValueError(f'Image.encoding {enc!r} is not supported (expected one of {", ".join(IMAGE_ENCODINGS)})')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ValueError(f'Image.width/height: zero-size image ({w}x{h})')
    if int(msg.is_bigendian) not in (0, 1):
        raise ValueError(f'Image.is_bigendian must be 0 or 1, got {int(msg.is_bigendian)}')
    channels = IMAGE_ENCODINGS[enc]
    if step < w * channels:
        raise ValueError(f'Image.step {step} is less than width*channels = {w}*{channels} = {w * channels} '
                         f'bytes for {enc}')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * h:
        raise ValueError(f'Image.data has {data.size} bytes but step*height = {step}*{h} = {step * h}')
    rows = data.reshape(h, step)[:, :w * channels].reshape(h, w, channels)
    if enc == 'rgb8':
        return rows
    if enc == 'bgr8':
        return np.ascontiguousarray(rows[:, :, ::-1])
    return np.repeat(rows, 3, axis=2)


def compressed_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (format 'jpeg', 'png', or image_transport's 'rgb8; jpeg compressed bgr8')
    -> (H, W, 3) uint8 RGB. Raises ValueError naming CompressedImage.format or .data."""
    fmt = str(msg.format).lower()
    if 'compresseddepth' in fmt or not any(f in fmt for f in COMPRESSED_FORMATS):
        raise ValueError(f'CompressedImage.format {msg.format!r} is not supported (expected jpeg or png)')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ValueError('CompressedImage.data is empty')
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise ValueError(f'CompressedImage.data ({data.size} bytes) is not a decodable {fmt} image (corrupt?)')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def byte_array(data) -> np.ndarray:
    """uint8[] payload as (N,) uint8: numpy from rosbags, array.array or bytes from rclpy."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8)


def depth_to_metres(msg) -> np.ndarray:
    """sensor_msgs/Image 32FC1 (metres) or 16UC1 (millimetres) -> (H, W) float32 metres, NaN where 0, NaN or
    inf (no reading). Honours step (row padding) and is_bigendian. Raises ValueError naming the field."""
    enc = str(msg.encoding)
    if enc not in DEPTH_ENCODINGS:
        raise ValueError(f'Image.encoding {enc!r} is not a depth encoding (expected one of '
                         f'{", ".join(DEPTH_ENCODINGS)})')
    dtype = np.dtype(DEPTH_ENCODINGS[enc])
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ValueError(f'Image.width/height: zero-size depth image ({w}x{h})')
    if step < w * dtype.itemsize:
        raise ValueError(f'Image.step {step} is less than width*{dtype.itemsize} = {w * dtype.itemsize} bytes '
                         f'for {enc}')
    data = byte_array(msg.data)
    if data.size < step * h:
        raise ValueError(f'Image.data has {data.size} bytes but step*height = {step}*{h} = {step * h}')
    rows = np.ascontiguousarray(data[:step * h].reshape(h, step)[:, :w * dtype.itemsize])
    d = rows.view(dtype.newbyteorder('>' if msg.is_bigendian else '<')).astype(np.float32)
    if enc == '16UC1':
        d /= np.float32(1000.0)
    d[~(np.isfinite(d) & (d > 0))] = np.nan
    return d


@dataclass
class Intrinsics:
    """A validated CameraInfo. K (3, 3) float64 pixels of the image as published; size (W, H);
    d: distortion coefficients (empty or all zero = none) of `model`."""
    K: np.ndarray
    size: tuple[int, int]
    d: np.ndarray
    model: str
    _maps: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_camera_info(cls, msg) -> 'Intrinsics':
        """Check a CameraInfo and keep what the localizer needs. Raises ValueError naming the field."""
        w, h = int(msg.width), int(msg.height)
        if w <= 0 or h <= 0:
            raise ValueError(f'CameraInfo.width/height is {w}x{h}; the image size must be given')
        k = np.asarray(msg.k, dtype=np.float64)
        if k.size != 9:
            raise ValueError(f'CameraInfo.k has {k.size} values, expected 9 (row-major 3x3)')
        K = k.reshape(3, 3).copy()
        if not np.all(np.isfinite(K)):
            raise ValueError(f'CameraInfo.k contains NaN or inf: {K.reshape(-1).tolist()}')
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f'CameraInfo.k has a zero or negative focal length (fx={K[0, 0]:g}, fy={K[1, 1]:g}); '
                             'the camera is not calibrated')
        if not np.allclose(K[2], [0.0, 0.0, 1.0]):
            raise ValueError(f'CameraInfo.k last row must be [0, 0, 1], got {K[2].tolist()}')
        bx, by = int(getattr(msg, 'binning_x', 0)), int(getattr(msg, 'binning_y', 0))
        if bx > 1 or by > 1:
            raise ValueError(f'CameraInfo.binning_x/binning_y = {bx}/{by}: binned images are not supported')
        roi = getattr(msg, 'roi', None)
        if roi is not None and int(roi.width) > 0 and (int(roi.width), int(roi.height)) != (w, h):
            raise ValueError(f'CameraInfo.roi {int(roi.width)}x{int(roi.height)} is a sub-window: not supported')
        d = np.asarray(msg.d, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(d)):
            raise ValueError(f'CameraInfo.d contains NaN or inf: {d.tolist()}')
        model = str(msg.distortion_model)
        # Distortion is never silently ignored (METHOD.md section 1): undistort, or reject the model.
        if np.any(d != 0) and model not in DISTORTION_MODELS:
            raise ValueError(f'CameraInfo.distortion_model {model!r} with non-zero d is not supported '
                             f'(expected one of {", ".join(DISTORTION_MODELS)}, or a rectified image with d = 0)')
        return cls(K=K, size=(w, h), d=d, model=model)

    @property
    def distorted(self) -> bool:
        return bool(np.any(self.d != 0))

    def same_as(self, other: 'Intrinsics | None') -> bool:
        """True when `other` describes the same camera (so cached undistortion maps can be kept)."""
        return (other is not None and self.size == other.size and self.model == other.model
                and np.array_equal(self.K, other.K) and np.array_equal(self.d, other.d))

    def rectify(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """Undistort `image` (H, W[, C]) of this camera's size to the pinhole camera K (same K, same size); no-op
        without distortion. nearest: nearest-neighbour lookup, for depth (no blending across depth edges or
        holes). The remap tables are computed once per Intrinsics (about a millisecond per frame afterwards)."""
        if not self.distorted:
            return image
        if self._maps is None:
            self._maps = cv2.initUndistortRectifyMap(self.K, self.d, None, self.K, self.size, cv2.CV_16SC2)
        return cv2.remap(image, self._maps[0], self._maps[1], cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def check_size(rgb: np.ndarray, cam: Intrinsics) -> None:
    """Raise ValueError unless the image (H, W, 3) has the size CameraInfo describes."""
    h, w = rgb.shape[:2]
    if (w, h) != cam.size:
        raise ValueError(f'image is {w}x{h} but CameraInfo.width/height says {cam.size[0]}x{cam.size[1]}')
