"""globloc_ros.imgmsg: camera messages -> numpy, on real sensor_msgs messages (no rclpy node needed)."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from globloc_ros import imgmsg

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # H=6, W=10


def image_msg(rgb: np.ndarray = RGB, encoding: str = 'rgb8', pad: int = 0) -> Image:
    """An Image holding `rgb` (H, W, 3) in `encoding`, each row padded by `pad` bytes."""
    h, w = rgb.shape[:2]
    pixels = {'rgb8': rgb, 'bgr8': rgb[:, :, ::-1], 'mono8': rgb[:, :, :1]}[encoding]
    rows = pixels.reshape(h, -1)
    rows = np.hstack([rows, np.full((h, pad), 77, np.uint8)])
    return Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=rows.shape[1],
                 data=rows.tobytes())


def camera_info(w: int = 10, h: int = 6, k=(8.0, 0.0, 4.5, 0.0, 8.0, 2.5, 0.0, 0.0, 1.0), d=(0.0,) * 5,
                model: str = 'plumb_bob') -> CameraInfo:
    return CameraInfo(width=w, height=h, k=list(k), d=list(d), distortion_model=model)


@pytest.mark.parametrize('pad', [0, 3])
def test_rgb8_bgr8_mono8_convert_exactly(pad):
    assert np.array_equal(imgmsg.image_to_rgb(image_msg(RGB, 'rgb8', pad)), RGB)
    assert np.array_equal(imgmsg.image_to_rgb(image_msg(RGB, 'bgr8', pad)), RGB)
    mono = imgmsg.image_to_rgb(image_msg(RGB, 'mono8', pad))
    assert mono.shape == RGB.shape and mono.dtype == np.uint8
    assert np.array_equal(mono, np.repeat(RGB[:, :, :1], 3, axis=2))


def test_rgb8_without_padding_is_a_view_not_a_copy():
    msg = image_msg(RGB, 'rgb8')
    out = imgmsg.image_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


def test_jpeg_and_png_decode_to_rgb():
    ok, png = cv2.imencode('.png', RGB[:, :, ::-1])
    assert ok
    out = imgmsg.compressed_to_rgb(CompressedImage(format='png', data=png.tobytes()))
    assert np.array_equal(out, RGB)  # png is lossless: exact, and channel order RGB
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[:, :, 0] = 200  # pure red: a swapped channel order would show up as blue
    ok, jpg = cv2.imencode('.jpg', smooth[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = imgmsg.compressed_to_rgb(CompressedImage(format='rgb8; jpeg compressed bgr8', data=jpg.tobytes()))
    assert out.shape == smooth.shape and np.abs(out.astype(int) - smooth).max() <= 3


@pytest.mark.parametrize('change, field', [
    (dict(encoding='rgba16'), 'Image.encoding'),
    (dict(encoding='32FC1'), 'Image.encoding'),
    (dict(width=0, height=0, step=0, data=b''), 'zero-size'),
    (dict(step=20), 'Image.step'),  # less than 3 * width = 30
    (dict(is_bigendian=7), 'Image.is_bigendian'),
    (dict(data=bytes(6 * 30 - 1)), 'Image.data'),  # one byte short of step * height
    (dict(data=bytes(6 * 30 + 30)), 'Image.data'),  # a row too many
])
def test_bad_image_raises_naming_the_field(change, field):
    msg = image_msg(RGB, 'rgb8')
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
        imgmsg.image_to_rgb(msg)


@pytest.mark.parametrize('msg, field', [
    (CompressedImage(format='jpeg', data=b'\xff\xd8\xff\xe0' + bytes(200)), 'CompressedImage.data'),
    (CompressedImage(format='png', data=b''), 'CompressedImage.data'),
    (CompressedImage(format='tiff', data=b'II*\x00'), 'CompressedImage.format'),
    (CompressedImage(format='16UC1; compressedDepth png', data=b'\x00'), 'CompressedImage.format'),
])
def test_bad_compressed_raises_naming_the_field(msg, field):
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
        imgmsg.compressed_to_rgb(msg)


def test_camera_info_gives_K_and_size():
    cam = imgmsg.Intrinsics.from_camera_info(camera_info())
    assert cam.size == (10, 6) and not cam.distorted
    assert np.array_equal(cam.K, [[8, 0, 4.5], [0, 8, 2.5], [0, 0, 1]])
    assert cam.rectify(RGB) is RGB  # no distortion: untouched
    imgmsg.check_size(RGB, cam)
    with pytest.raises(ValueError, match=r'image is 9x6 but CameraInfo\.width/height says 10x6'):
        imgmsg.check_size(RGB[:, :9], cam)


@pytest.mark.parametrize('info, field', [
    (camera_info(k=(0.0, 0, 4.5, 0, 0.0, 2.5, 0, 0, 1)), r'CameraInfo\.k has a zero'),
    (camera_info(k=(8.0, 0, float('nan'), 0, 8.0, 2.5, 0, 0, 1)), r'CameraInfo\.k contains NaN'),
    (camera_info(k=(8.0, 0, 4.5, 0, 8.0, 2.5, 0, 0, 0)), r'CameraInfo\.k last row'),
    (camera_info(w=0, h=0), r'CameraInfo\.width/height'),
    (camera_info(d=(0.1, 0, 0, 0), model='equidistant'), r'CameraInfo\.distortion_model'),
    (camera_info(d=(float('inf'), 0, 0, 0, 0)), r'CameraInfo\.d contains'),
])
def test_bad_camera_info_raises_naming_the_field(info, field):
    with pytest.raises(ValueError, match=field):
        imgmsg.Intrinsics.from_camera_info(info)


def test_distorted_camera_is_undistorted_not_ignored():
    K = np.array([[60.0, 0, 39.5], [0, 60.0, 29.5], [0, 0, 1]])
    d = np.array([-0.3, 0.1, 0.0, 0.0, 0.0])
    # A checkerboard seen through the lens, then undistorted, must come back close to the pinhole view.
    yy, xx = np.mgrid[0:60, 0:80]
    pinhole = ((((xx // 8) + (yy // 8)) % 2) * 255).astype(np.uint8)
    pinhole = np.repeat(pinhole[:, :, None], 3, axis=2)
    map_x, map_y = _distort_maps(K, d, (80, 60))
    distorted = cv2.remap(pinhole, map_x, map_y, cv2.INTER_NEAREST)
    cam = imgmsg.Intrinsics.from_camera_info(camera_info(80, 60, K.reshape(-1), d))
    assert cam.distorted
    out = cam.rectify(distorted)
    inner = (slice(5, 55), slice(5, 75))  # the border has no source pixels
    err_raw = np.abs(distorted[inner].astype(int) - pinhole[inner]).mean()
    err_rect = np.abs(out[inner].astype(int) - pinhole[inner]).mean()
    assert err_rect < 0.5 * err_raw

    # Depth through the same lens (same maps as above): the nearest lookup keeps every value one of the recorded
    # ones, where the linear one blends the 1 m / 3 m edges of the checkerboard into depths nothing has.
    depth = np.where(pinhole[..., 0] > 0, 3.0, 1.0).astype(np.float32)
    seen = cv2.remap(depth, map_x, map_y, cv2.INTER_NEAREST)
    assert set(np.unique(cam.rectify(seen, nearest=True)[inner])) == {1.0, 3.0}
    assert len(np.unique(cam.rectify(seen)[inner])) > 10


def test_depth_millimetres_and_metres():
    mm = np.array([[0, 1500, 65535], [1, 2, 3]], np.uint16)
    msg = Image(height=2, width=3, encoding='16UC1', is_bigendian=0, step=6, data=mm.tobytes())
    np.testing.assert_array_equal(imgmsg.depth_to_metres(msg),
                                  np.array([[np.nan, 1.5, 65.535], [0.001, 0.002, 0.003]], np.float32))
    m = np.array([[1.25, -1.0, np.inf, np.nan]], np.float32)
    msg = Image(height=1, width=4, encoding='32FC1', is_bigendian=0, step=16, data=m.tobytes())
    np.testing.assert_array_equal(imgmsg.depth_to_metres(msg), [[1.25, np.nan, np.nan, np.nan]])


@pytest.mark.parametrize('change, field', [
    (dict(encoding='rgb8'), "Image.encoding 'rgb8' is not a depth encoding"),
    (dict(step=4), r'Image.step 4 is less than width\*2'),
    (dict(data=bytes(10)), 'Image.data has 10 bytes but step\\*height'),
    (dict(width=0), 'zero-size'),
])
def test_bad_depth_raises_naming_the_field(change, field):
    msg = Image(height=2, width=3, encoding='16UC1', is_bigendian=0, step=6, data=bytes(12))
    for k, v in change.items():
        setattr(msg, k, v)
    with pytest.raises(ValueError, match=field):
        imgmsg.depth_to_metres(msg)


def _distort_maps(K, d, size):
    """For each distorted pixel, where it comes from in the pinhole image (the inverse of undistortion)."""
    w, h = size
    pts = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 1, 2).astype(np.float64)
    und = cv2.undistortPoints(pts, K, d, P=K).reshape(h, w, 2).astype(np.float32)
    return und[..., 0], und[..., 1]


def test_imgmsg_does_not_import_rclpy():
    code = 'import sys, globloc_ros.imgmsg; sys.exit(1 if "rclpy" in sys.modules else 0)'
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0
