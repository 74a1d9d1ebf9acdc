"""Images as clients send them: data URLs per RFC 2397 and every PIL mode converted to RGB by its meaning."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from server.errors import APIError
from server.images import ImageLimits, decode_data_url, parse_data_url, to_rgb

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n-not-really").decode()


@pytest.mark.parametrize("url", [
    "data:image/png;base64," + PNG, "DATA:IMAGE/PNG;BASE64," + PNG, "data:image/png;charset=US-ASCII;Base64," + PNG,
    " data:image/png;base64," + PNG[:10] + "\r\n" + PNG[10:] + " ", "data:;base64," + PNG,
    "data:application/octet-stream;base64," + PNG, "data:image/png;base64," + PNG.rstrip("="),
    "data:image/png;base64," + PNG.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"),
])
def test_data_url_spellings_give_the_same_bytes(url):
    assert parse_data_url(url, 2**20) == b"\x89PNG\r\n\x1a\n-not-really"


def test_data_url_without_base64_is_percent_decoded():
    assert parse_data_url("data:image/svg+xml,%3Csvg%3E", 2**20) == b"<svg>"


@pytest.mark.parametrize("url,status,match", [
    ("data:text/plain;base64," + PNG, 400, "MIME"), ("data:image/png;base64", 400, "data:image/<type>;base64"),
    ("data:image/png;base64,@@@", 400, "base64"), ("data:image/png;base64," + "A" * 4000, 413, "exceeds"),
])
def test_bad_data_urls(url, status, match):
    with pytest.raises(APIError) as e:
        parse_data_url(url, 1024)
    assert e.value.status == status and match in e.value.message and e.value.param == "messages"


def _roundtrip(img: Image.Image, fmt: str = "PNG") -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return decode_data_url(f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode(), ImageLimits())


def _px(img: Image.Image) -> tuple:
    return tuple(int(v) for v in np.asarray(img)[0, 0])


def test_fully_transparent_pixels_are_white():
    img = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert _px(_roundtrip(img)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert _px(to_rgb(half)) == (127, 127, 127)
    assert _px(to_rgb(Image.new("LA", (2, 2), (0, 0)))) == (255, 255, 255)


def test_palette_transparency_is_white():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 1
    assert _px(_roundtrip(img)) == (255, 255, 255)
    img.info.pop("transparency")
    assert _px(_roundtrip(img)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    img = _roundtrip(Image.fromarray(a))  # a 16-bit PNG opens as I;16
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255, 4]
    as_int = to_rgb(Image.fromarray(a.astype(np.int32)))  # mode I holding 16-bit values
    assert np.asarray(as_int)[0, :, 0].tolist() == [0, 128, 255, 4]
    small = to_rgb(Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32)))  # mode I holding 8-bit values
    assert np.asarray(small)[0, :, 0].tolist() == [0, 7, 255]


def test_float_images_in_unit_range_are_scaled():
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert np.asarray(unit)[0, :, 0].tolist() == [0, 128, 255]
    wide = to_rgb(Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32)))
    assert np.asarray(wide)[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("mode,colour,expect", [
    ("1", 1, (255, 255, 255)), ("L", 77, (77, 77, 77)), ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGB", (1, 2, 3), (1, 2, 3)), ("YCbCr", (255, 128, 128), (255, 255, 255)),
])
def test_other_modes_by_their_meaning(mode, colour, expect):
    out = to_rgb(Image.new(mode, (2, 2), colour))
    assert out.mode == "RGB" and _px(out) == expect


def test_lab_goes_through_a_colour_transform():
    white = to_rgb(Image.new("LAB", (2, 2), (255, 128, 128)))  # L 100, a 0, b 0
    assert all(v >= 250 for v in _px(white))


def test_aspect_ratio_limit():
    with pytest.raises(APIError) as e:
        _roundtrip(Image.new("RGB", (1, 20000), "white"))
    assert e.value.status == 400 and "aspect ratio" in e.value.message
    assert _roundtrip(Image.new("RGB", (20, 400), "white")).size == (20, 400)


def test_sixteen_bit_grey_with_a_colour_key_is_composited_onto_white():
    a = np.full((4, 4), 40 * 257, dtype=np.uint16)
    a[0, 0] = 1234  # the transparent value
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", transparency=1234)
    img = decode_data_url("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), ImageLimits())
    assert _px(img) == (255, 255, 255) and tuple(np.asarray(img)[1, 1]) == (40, 40, 40)


def test_32_bit_grey_is_read_at_the_depth_that_holds_it():
    deep = to_rgb(Image.fromarray(np.array([[0, 2**23, 2**24 - 1]], dtype=np.int32)))
    assert np.asarray(deep)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("orientation, transpose", [(1, None), (3, Image.Transpose.ROTATE_180),
                                                    (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(orientation, transpose):
    """A JPEG stored sideways with EXIF Orientation 6 (a phone photo held upright) is read upright."""
    from shapeworld.world import make_scene

    upright = make_scene("bait", 0, 4321).image().resize((96, 64))  # not square: a rotation shows in the size
    stored = upright if transpose is None else upright.transpose(
        {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}
        .get(transpose, transpose))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    got = decode_data_url("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), ImageLimits())
    assert got.size == upright.size
    err = np.abs(np.asarray(got, dtype=int) - np.asarray(upright, dtype=int)).mean()
    wrong = np.abs(np.asarray(got, dtype=int) - np.asarray(upright.transpose(Image.Transpose.ROTATE_180), dtype=int)).mean()
    assert err < 8 and wrong > 3 * err, (err, wrong)  # JPEG's loss only; the picture is not symmetric
