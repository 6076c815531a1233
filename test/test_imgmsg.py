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
    (dict(encoding='nv21'), 'Image.encoding'),
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


# ---------------------------------------------------------------------------------------------- cv_bridge's encodings
# The reference for each encoding: (channels, dtype, the cv2.cvtColor code to RGB that cv_bridge applies). Bayer
# codes are written with OpenCV's unambiguous aliases (COLOR_BayerRGGB2RGB: top-left 2x2 block R G / G B).
REFERENCE = {
    'rgb8': (3, np.uint8, None), 'bgr8': (3, np.uint8, cv2.COLOR_BGR2RGB), '8UC3': (3, np.uint8, cv2.COLOR_BGR2RGB),
    'rgba8': (4, np.uint8, cv2.COLOR_RGBA2RGB), 'bgra8': (4, np.uint8, cv2.COLOR_BGRA2RGB),
    'mono8': (1, np.uint8, cv2.COLOR_GRAY2RGB), '8UC1': (1, np.uint8, cv2.COLOR_GRAY2RGB),
    'rgb16': (3, np.uint16, None), 'bgr16': (3, np.uint16, cv2.COLOR_BGR2RGB),
    'rgba16': (4, np.uint16, cv2.COLOR_RGBA2RGB), 'bgra16': (4, np.uint16, cv2.COLOR_BGRA2RGB),
    'mono16': (1, np.uint16, cv2.COLOR_GRAY2RGB), '16UC1': (1, np.uint16, cv2.COLOR_GRAY2RGB),
    'yuv422': (2, np.uint8, cv2.COLOR_YUV2RGB_UYVY), 'yuv422_yuy2': (2, np.uint8, cv2.COLOR_YUV2RGB_YUY2),
    **{f'bayer_{p}{bits}': (1, np.uint8 if bits == 8 else np.uint16, getattr(cv2, f'COLOR_Bayer{p.upper()}2RGB'))
       for p in ('rggb', 'bggr', 'gbrg', 'grbg') for bits in (8, 16)},
}


def raw_msg(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: int = 0) -> Image:
    """An Image of `pixels` (H, W, C) uint8/uint16 as stored in memory: 16-bit values in the byte order
    `bigendian` says, each row followed by `pad` bytes of junk."""
    h, w = pixels.shape[:2]
    dtype = ('>' if bigendian else '<') + ('u2' if pixels.dtype == np.uint16 else 'u1')
    rows = pixels.astype(dtype).reshape(h, -1).view(np.uint8)
    rows = np.hstack([rows, np.full((h, pad), 201, np.uint8)])
    return Image(height=h, width=w, encoding=encoding, is_bigendian=bigendian, step=rows.shape[1],
                 data=rows.tobytes())


def to_8bit(rgb: np.ndarray) -> np.ndarray:
    """cv_bridge's 16 -> 8 bit step (convertTo with alpha 255/65535), written out."""
    return np.round(rgb.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8) if rgb.dtype == np.uint16 else rgb


@pytest.mark.parametrize('bigendian', [0, 1])
@pytest.mark.parametrize('pad', [0, 5])
@pytest.mark.parametrize('encoding', list(REFERENCE))
def test_every_encoding_matches_opencv(encoding, pad, bigendian):
    channels, dtype, code = REFERENCE[encoding]
    assert set(REFERENCE) == set(imgmsg.IMAGE_ENCODINGS)  # the table covers exactly what imgmsg accepts
    pixels = np.random.default_rng(len(encoding) + pad).integers(0, np.iinfo(dtype).max + 1, (6, 10, channels),
                                                                     dtype=dtype)
    expected = to_8bit(pixels if code is None else cv2.cvtColor(pixels, code))
    out = imgmsg.image_to_rgb(raw_msg(pixels, encoding, pad, bigendian))
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    if dtype == np.uint16:  # the same bytes read with the wrong byte order must not pass
        swapped = raw_msg(pixels, encoding, pad, bigendian)
        swapped.is_bigendian = 1 - bigendian
        assert not np.array_equal(imgmsg.image_to_rgb(swapped), expected)


@pytest.mark.parametrize('pattern', ['rggb', 'bggr', 'gbrg', 'grbg'])
@pytest.mark.parametrize('bits', [8, 16])
def test_bayer_pattern_is_named_from_the_top_left_pixel(pattern, bits):
    """A flat colour behind each ROS pattern comes back as that colour (catches OpenCV's offset names)."""
    colour = {'r': 200, 'g': 100, 'b': 30}
    block = np.array([[colour[pattern[0]], colour[pattern[1]]], [colour[pattern[2]], colour[pattern[3]]]])
    mosaic = np.tile(block, (4, 5))[:, :, None]  # 8 x 10
    if bits == 16:
        mosaic = mosaic.astype(np.uint16) * 257  # 8-bit v -> 16-bit v * 257 -> back to exactly v
    out = imgmsg.image_to_rgb(raw_msg(mosaic.astype(np.uint8 if bits == 8 else np.uint16), f'bayer_{pattern}{bits}'))
    np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to([200, 100, 30], (4, 6, 3)))


@pytest.mark.parametrize('encoding, pair', [('yuv422', 'UYVY'), ('yuv422_yuy2', 'YUYV')])
def test_yuv422_byte_order(encoding, pair):
    """Pixel pairs written byte by byte (UYVY: U Y0 V Y1; YUY2: Y0 U Y1 V) give BT.601 colours."""
    y0, y1, u, v = 60, 180, 90, 170
    values = {'U': u, 'V': v}
    pairs = np.array([[values.get(c, 0) for c in pair]] * 5, np.uint8).reshape(1, 20)
    pairs[0, [i for i in range(20) if pair[i % 4] == 'Y']] = [y0, y1] * 5
    msg = Image(height=1, width=10, encoding=encoding, is_bigendian=0, step=20, data=pairs.tobytes())
    out = imgmsg.image_to_rgb(msg).astype(float)
    for x, y in ((0, y0), (1, y1)):  # limited-range BT.601, as OpenCV's 4:2:2 conversion
        c, d, e = 1.164 * (y - 16), u - 128, v - 128
        rgb = np.clip([c + 1.596 * e, c - 0.391 * d - 0.813 * e, c + 2.018 * d], 0, 255)
        np.testing.assert_allclose(out[0, x::2], np.broadcast_to(rgb, (5, 3)), atol=2)


def test_16bit_scaling_is_cv_bridges():
    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)  # 255/65535 = 1/257, rounded
    out = imgmsg.image_to_rgb(raw_msg(values[:, :, None], 'mono16', bigendian=1))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 1, 128, 255])


def test_odd_width_yuv422_names_the_field():
    msg = raw_msg(np.zeros((2, 3, 2), np.uint8), 'yuv422')
    with pytest.raises(ValueError, match=r'Image\.width 3 is odd'):
        imgmsg.image_to_rgb(msg)


# ---------------------------------------------------------------------------------------------- image_transport
def png(pixels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.png', pixels)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize('fmt, pixels, order', [
    ('png', RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8), cv2.COLOR_BGR2RGB),  # plain: OpenCV's BGR
    ('png', RNG.integers(0, 256, (6, 10, 4), dtype=np.uint8), cv2.COLOR_BGRA2RGB),
    ('png', RNG.integers(0, 256, (6, 10), dtype=np.uint8), cv2.COLOR_GRAY2RGB),
    ('bgr8; png compressed bgr8', RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8), cv2.COLOR_BGR2RGB),
    ('rgb8; png compressed bgr8', RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8), cv2.COLOR_BGR2RGB),
    ('rgba8; png compressed bgr8', RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8), cv2.COLOR_BGR2RGB),
    ('rgb8; png compressed rgb8', RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8), None),  # stored as RGB
    ('mono8; png compressed mono8', RNG.integers(0, 256, (6, 10), dtype=np.uint8), cv2.COLOR_GRAY2RGB),
    ('mono16; png compressed ', RNG.integers(0, 65536, (6, 10), dtype=np.uint16), cv2.COLOR_GRAY2RGB),
    ('16UC1; png compressed ', RNG.integers(0, 65536, (6, 10), dtype=np.uint16), cv2.COLOR_GRAY2RGB),
    ('bgr16; png compressed bgr16', RNG.integers(0, 65536, (6, 10, 3), dtype=np.uint16), cv2.COLOR_BGR2RGB),
    ('bayer_rggb8; png compressed ', RNG.integers(0, 256, (6, 10), dtype=np.uint8), cv2.COLOR_BayerRGGB2RGB),
    ('bayer_gbrg16; png compressed ', RNG.integers(0, 65536, (6, 10), dtype=np.uint16), cv2.COLOR_BayerGBRG2RGB),
])
def test_compressed_formats_match_opencv(fmt, pixels, order):
    expected = to_8bit(pixels if order is None else cv2.cvtColor(pixels, order))
    out = imgmsg.to_rgb(CompressedImage(format=fmt, data=png(pixels)))
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('fmt', ['jpeg', 'rgb8; jpeg compressed bgr8', 'bgr8; jpeg compressed bgr8',
                                 'mono8; jpeg compressed mono8'])
def test_jpeg_formats_match_opencv(fmt):
    mono = fmt.startswith('mono')
    pixels = RNG.integers(0, 256, (16, 16) if mono else (16, 16, 3), dtype=np.uint8)
    ok, jpg = cv2.imencode('.jpg', pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    decoded = cv2.imdecode(jpg, cv2.IMREAD_UNCHANGED)
    expected = cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB if mono else cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(imgmsg.to_rgb(CompressedImage(format=fmt, data=jpg.tobytes())), expected)


def test_to_rgb_takes_both_message_types():
    np.testing.assert_array_equal(imgmsg.to_rgb(image_msg(RGB, 'bgr8', 2)), RGB)
    np.testing.assert_array_equal(imgmsg.to_rgb(CompressedImage(format='png', data=png(RGB[:, :, ::-1]))), RGB)


# ---------------------------------------------------------------------------------------------- compressedDepth
DEPTH = np.array([[0.0, 0.5, 1.234, 2.0, 4.5], [7.25, 9.99, 12.0, np.nan, 0.75]], np.float32)  # metres


def compressed_depth(depth: np.ndarray, encoding: str, codec: str = 'compressedDepth png', depth_max: float = 10.0,
                     quantization: float = 100.0) -> CompressedImage:
    """What compressed_depth_image_transport publishes for `depth` (H, W) metres: format, 12-byte header, PNG."""
    if encoding == '16UC1':
        header = np.array([0, 0, 0], '<i4').tobytes()  # INV_DEPTH, depthParam unused
        pixels = np.nan_to_num(np.round(depth * 1000), nan=0).astype(np.uint16)
        pixels[depth > depth_max] = 0
    else:
        a = np.float32(quantization * (quantization + 1.0))
        b = np.float32(1.0 - a / np.float32(depth_max))
        valid = (depth > 0) & (depth < depth_max)  # NaN and beyond depth_max: 0 (0 itself: inf in C++, 0 here)
        with np.errstate(divide='ignore', invalid='ignore'):
            inv = np.where(valid, a / depth + b, 0)  # float32, truncated to uint16 like the C++ assignment
        pixels = inv.astype(np.uint16)
        header = np.array([0], '<i4').tobytes() + np.array([a, b], '<f4').tobytes()
    return CompressedImage(format=f'{encoding}; {codec}', data=header + png(pixels))


@pytest.mark.parametrize('codec', ['compressedDepth png', 'compressedDepth'])
def test_compressed_depth_millimetres(codec):
    out = imgmsg.depth_to_metres(compressed_depth(DEPTH, '16UC1', codec))
    expected = np.round(DEPTH * 1000) / np.float32(1000)
    expected[~(expected > 0) | (DEPTH > 10)] = np.nan  # 0 and beyond depth_max: no reading
    np.testing.assert_allclose(out, expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize('codec', ['compressedDepth png', 'compressedDepth'])
def test_compressed_depth_inverse_depth_32fc1(codec):
    msg = compressed_depth(DEPTH, '32FC1', codec)
    out = imgmsg.depth_to_metres(msg)
    a, b = np.frombuffer(bytes(msg.data[4:12]), '<f4')
    v = cv2.imdecode(np.frombuffer(bytes(msg.data[12:]), np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float32)
    with np.errstate(divide='ignore'):
        expected = np.where(v > 0, a / (v - b), np.nan).astype(np.float32)  # the C++ decoder's formula
    expected[~(expected > 0)] = np.nan
    np.testing.assert_array_equal(out, expected)
    valid = np.isfinite(DEPTH) & (DEPTH > 0) & (DEPTH < 10)
    assert np.array_equal(np.isfinite(out), valid)
    np.testing.assert_allclose(out[valid], DEPTH[valid], rtol=0.01)  # quantization: about d^2 / 10100


@pytest.mark.parametrize('msg, field', [
    (CompressedImage(format='16UC1; compressedDepth rvl', data=bytes(40)), r"CompressedImage\.format .*only png"),
    (CompressedImage(format='png', data=bytes(40)), r"CompressedImage\.format 'png' is not a compressedDepth"),
    (CompressedImage(format='8UC1; compressedDepth png', data=bytes(40)), r'CompressedImage\.format'),
    (CompressedImage(format='16UC1; compressedDepth png', data=bytes(12)), r'CompressedImage\.data has 12 bytes'),
    (CompressedImage(format='32FC1; compressedDepth png', data=bytes(12) + b'\x89PNG junk'),
     r'CompressedImage\.data .* 16-bit single-channel PNG'),
    (CompressedImage(format='16UC1; compressedDepth png', data=bytes(12) + png(np.zeros((2, 2), np.uint8))),
     r'CompressedImage\.data .* 16-bit single-channel PNG'),
])
def test_bad_compressed_depth_names_the_field(msg, field):
    with pytest.raises(ValueError, match=field):
        imgmsg.depth_to_metres(msg)
    assert '\n' not in str(pytest.raises(ValueError, imgmsg.depth_to_metres, msg).value)
