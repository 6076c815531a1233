"""Camera messages -> numpy: our own small cv_bridge (cv_bridge is not available as a wheel).

Works on anything shaped like sensor_msgs Image / CompressedImage / CameraInfo (rclpy messages,
rosbags messages), and never imports rclpy. Every check raises a one-line ValueError naming the message
field that is wrong, so the node can log it once and show it in /diagnostics, and the bag reader can skip
that one frame.

    rgb = to_rgb(msg)                        # Image or CompressedImage -> (H, W, 3) uint8 RGB
    rgb = image_to_rgb(msg)                  # any IMAGE_ENCODINGS; a view into msg.data for unpadded rgb8
    rgb = compressed_to_rgb(msg)             # jpeg / png with image_transport's format strings
    depth = depth_to_metres(msg)             # 32FC1 m / 16UC1 mm Image, or compressedDepth -> (H, W) float32 m
    cam = Intrinsics.from_camera_info(info)  # K (3, 3) float64 pixels, size (W, H), distortion
    rgb = cam.rectify(rgb)                   # undistorts when CameraInfo.d is non-zero, else a no-op
    depth = cam.rectify(depth, nearest=True) # the same for a depth image registered to it
    check_size(rgb, cam)                     # image size must equal CameraInfo width/height

Colour conversion does what cv_bridge's toCvCopy(msg, 'rgb8') does: the same OpenCV cvtColor codes
(Bayer patterns named as ROS names them, rggb = OpenCV's BayerBG), 8UC1/8UC3/16UC1 read as
mono8/bgr8/mono16, and 16-bit data brought to 8 bits after the colour conversion by x * 255 / 65535
(rounded). 16-bit data honours is_bigendian; every Image honours step (row padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np


class Layout(NamedTuple):
    """How cv_bridge reads one encoding: channels per pixel, bytes per channel, and the pixel order."""
    channels: int
    itemsize: int
    order: str  # a key of _TO_RGB


# encoding -> Layout: everything cv_bridge converts to rgb8 (sensor_msgs/image_encodings.hpp names)
IMAGE_ENCODINGS: dict[str, Layout] = {
    'rgb8': Layout(3, 1, 'rgb'), 'bgr8': Layout(3, 1, 'bgr'), 'rgba8': Layout(4, 1, 'rgba'),
    'bgra8': Layout(4, 1, 'bgra'), 'mono8': Layout(1, 1, 'gray'),
    'rgb16': Layout(3, 2, 'rgb'), 'bgr16': Layout(3, 2, 'bgr'), 'rgba16': Layout(4, 2, 'rgba'),
    'bgra16': Layout(4, 2, 'bgra'), 'mono16': Layout(1, 2, 'gray'),
    '8UC1': Layout(1, 1, 'gray'), '8UC3': Layout(3, 1, 'bgr'), '16UC1': Layout(1, 2, 'gray'),  # OpenCV's defaults
    'yuv422': Layout(2, 1, 'uyvy'), 'yuv422_yuy2': Layout(2, 1, 'yuy2'),
    **{f'bayer_{p}{bits}': Layout(1, bits // 8, f'bayer_{p}') for p in ('rggb', 'bggr', 'gbrg', 'grbg')
       for bits in (8, 16)},
}
_TO_RGB = {  # pixel order -> cv2.cvtColor code to RGB (None: already RGB); the codes cv_bridge uses
    'rgb': None, 'bgr': cv2.COLOR_BGR2RGB, 'rgba': cv2.COLOR_RGBA2RGB, 'bgra': cv2.COLOR_BGRA2RGB,
    'gray': cv2.COLOR_GRAY2RGB, 'uyvy': cv2.COLOR_YUV2RGB_UYVY, 'yuy2': cv2.COLOR_YUV2RGB_YUY2,
    # ROS names a Bayer pattern by its top-left 2x2 block; OpenCV's short names by the 2nd and 3rd pixel of the
    # second row, so ROS rggb is OpenCV's BayerBG (= cv2.COLOR_BayerRGGB2RGB), as in cv_bridge.
    'bayer_rggb': cv2.COLOR_BayerBG2RGB, 'bayer_bggr': cv2.COLOR_BayerRG2RGB,
    'bayer_gbrg': cv2.COLOR_BayerGR2RGB, 'bayer_grbg': cv2.COLOR_BayerGB2RGB,
}
_COLOUR = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'rgb16', 'bgr16', 'rgba16', 'bgra16')  # image_encodings isColor
DEPTH_ENCODINGS = {'32FC1': np.float32, '16UC1': np.uint16}  # metres, millimetres (REP-118)
COMPRESSED_FORMATS = ('jpeg', 'jpg', 'png')
COMPRESSED_DEPTH_HEADER = 12  # compressed_depth_image_transport ConfigHeader: int32 format, float32 depthParam[2]
DISTORTION_MODELS = ('plumb_bob', 'rational_polynomial')  # what cv2.initUndistortRectifyMap handles


def to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image or CompressedImage (told apart by CompressedImage.format) -> (H, W, 3) uint8 RGB."""
    return compressed_to_rgb(msg) if hasattr(msg, 'format') else image_to_rgb(msg)


def pixels_to_rgb(pixels: np.ndarray, order: str) -> np.ndarray:
    """(H, W, C) uint8 or uint16 pixels in `order` (a Layout.order) -> (H, W, 3) uint8 RGB, as cv_bridge does:
    the colour conversion first, then 16 bits to 8 by x * 255 / 65535, rounded. Raises ValueError (naming
    Image.data) if OpenCV refuses the pixels."""
    code = _TO_RGB[order]
    try:
        rgb = pixels if code is None else cv2.cvtColor(pixels, code)
        if rgb.dtype == np.uint16:
            rgb = cv2.convertScaleAbs(rgb, alpha=255.0 / 65535.0)  # = cv_bridge's convertTo(CV_8U, 255/65535)
    except cv2.error as e:
        raise ValueError(f'Image.data: OpenCV cannot convert these {order} pixels {pixels.shape}: '
                         f'{str(e).strip().splitlines()[-1]}') from None
    return rgb


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image in any of IMAGE_ENCODINGS -> (H, W, 3) uint8 RGB.

    rgb8 with step == 3W comes back as a read-only view of msg.data (no copy); the rest is converted.
    Raises ValueError naming the field: encoding, width/height, is_bigendian, step, data.
    """
    enc = str(msg.encoding)
    if enc not in IMAGE_ENCODINGS:
        raise ValueError(f'Image.encoding {enc!r} is not supported (expected one of {", ".join(IMAGE_ENCODINGS)})')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ValueError(f'Image.width/height: zero-size image ({w}x{h})')
    if int(msg.is_bigendian) not in (0, 1):
        raise ValueError(f'Image.is_bigendian must be 0 or 1, got {int(msg.is_bigendian)}')
    layout = IMAGE_ENCODINGS[enc]
    row_bytes = w * layout.channels * layout.itemsize
    if step < row_bytes:
        raise ValueError(f'Image.step {step} is less than width*channels*bytes = {w}*{layout.channels}*'
                         f'{layout.itemsize} = {row_bytes} for {enc}')
    if layout.order in ('uyvy', 'yuy2') and w % 2:
        raise ValueError(f'Image.width {w} is odd; {enc} stores pixel pairs')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * h:
        raise ValueError(f'Image.data has {data.size} bytes but step*height = {step}*{h} = {step * h}')
    rows = data.reshape(h, step)[:, :row_bytes]
    if layout.itemsize == 2:
        rows = np.ascontiguousarray(rows).view('>u2' if msg.is_bigendian else '<u2').astype(np.uint16)
    return pixels_to_rgb(rows.reshape(h, w, layout.channels), layout.order)


def compressed_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage -> (H, W, 3) uint8 RGB, read the way image_transport's compressed
    subscriber reads it: format 'jpeg' / 'png' holds OpenCV's channel order (mono, BGR, BGRA); format
    '<encoding>; <jpeg|png> compressed <target>' (e.g. 'rgb8; jpeg compressed bgr8', 'mono16; png compressed ')
    holds BGR when the target says 'bgr', else RGB, for a colour encoding, and the encoding's own single
    channel otherwise (mono or a Bayer mosaic); 16-bit png comes to 8 bits as in image_to_rgb.
    Raises ValueError naming CompressedImage.format or .data."""
    fmt = str(msg.format)
    encoding, sep, target = (s.strip() for s in fmt.partition(';'))
    if 'compresseddepth' in fmt.lower():
        raise ValueError(f'CompressedImage.format {fmt!r} is a compressedDepth depth image, not a colour image')
    if not any(f in fmt.lower() for f in COMPRESSED_FORMATS):
        raise ValueError(f'CompressedImage.format {fmt!r} is not supported (expected jpeg or png)')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ValueError('CompressedImage.data is empty')
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise ValueError(f'CompressedImage.data ({data.size} bytes) is not a decodable {fmt} image (corrupt?)')
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels == 1:
        bayer = sep and encoding.startswith('bayer_') and encoding in IMAGE_ENCODINGS
        order = IMAGE_ENCODINGS[encoding].order if bayer else 'gray'
    elif channels in (3, 4):
        order = 'rgb' if sep and encoding in _COLOUR and 'compressed bgr' not in target else 'bgr'
        order += 'a' if channels == 4 else ''
    else:
        raise ValueError(f'CompressedImage.data decodes to {channels} channels (expected 1, 3 or 4)')
    return pixels_to_rgb(pixels, order)


def byte_array(data) -> np.ndarray:
    """uint8[] payload as (N,) uint8: numpy from rosbags, array.array or bytes from rclpy."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8)


def depth_to_metres(msg) -> np.ndarray:
    """A depth image -> (H, W) float32 metres, NaN where 0, NaN or inf (no reading).

    sensor_msgs/Image 32FC1 (metres) or 16UC1 (millimetres), honouring step (row padding) and is_bigendian;
    or a CompressedImage of compressed_depth_image_transport (see compressed_depth_to_metres).
    Raises ValueError naming the field."""
    if hasattr(msg, 'format'):
        return compressed_depth_to_metres(msg)
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


def compressed_depth_to_metres(msg) -> np.ndarray:
    """compressed_depth_image_transport's CompressedImage -> (H, W) float32 metres, NaN = no reading.

    format '16UC1; compressedDepth[ png]' or '32FC1; compressedDepth[ png]'; data = a 12-byte header
    (int32 format, float32 depthQuantA, depthQuantB; little endian) then a 16-bit PNG: millimetres for 16UC1,
    quantized inverse depth v for 32FC1 (depth = depthQuantA / (v - depthQuantB), v = 0: none).
    Raises ValueError naming CompressedImage.format or .data."""
    fmt = str(msg.format)
    encoding, sep, codec = (s.strip() for s in fmt.partition(';'))
    if not codec.startswith('compressedDepth') or encoding not in DEPTH_ENCODINGS:
        raise ValueError(f'CompressedImage.format {fmt!r} is not a compressedDepth depth image (expected '
                         "'16UC1; compressedDepth png' or '32FC1; compressedDepth png')")
    if codec not in ('compressedDepth', 'compressedDepth png'):
        raise ValueError(f'CompressedImage.format {fmt!r}: only png compressedDepth is supported')
    data = byte_array(msg.data)
    if data.size <= COMPRESSED_DEPTH_HEADER:
        raise ValueError(f'CompressedImage.data has {data.size} bytes: no PNG after the '
                         f'{COMPRESSED_DEPTH_HEADER}-byte compressedDepth header')
    quant_a, quant_b = np.frombuffer(data[4:COMPRESSED_DEPTH_HEADER].tobytes(), dtype='<f4')
    png = cv2.imdecode(data[COMPRESSED_DEPTH_HEADER:], cv2.IMREAD_UNCHANGED)
    if png is None or png.ndim != 2 or png.dtype != np.uint16:
        raise ValueError(f'CompressedImage.data ({data.size} bytes) does not hold a 16-bit single-channel PNG '
                         f'after its {COMPRESSED_DEPTH_HEADER}-byte header (corrupt?)')
    if encoding == '16UC1':
        d = png.astype(np.float32) / np.float32(1000.0)
    else:
        with np.errstate(divide='ignore', invalid='ignore'):
            d = quant_a / (png.astype(np.float32) - quant_b)  # float32, as the C++ decoder computes it
        d[png == 0] = np.nan
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
