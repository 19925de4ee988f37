"""Every image mode ends up as the same 8-bit RGB picture, and the guards fire before any pixel is decoded."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_sapo.data.images import ImageError, ImageRef, open_image


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose IHDR declares width x height (8-bit RGB) but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def load_file(tmp_path: Path, img: Image.Image, name: str, **save) -> Image.Image:
    path = tmp_path / name
    img.save(path, **save)
    out = ImageRef(path=path).load()
    assert out.mode == "RGB"
    return out


def test_palette_png(tmp_path):
    img = Image.new("P", (6, 4))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((5, 3), 1)
    out = load_file(tmp_path, img, "p.png")
    assert out.size == (6, 4)
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((5, 3)) == (200, 100, 50)


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    out = load_file(tmp_path, img, "pt.png", transparency=0)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert out.getpixel((1, 1)) == (0, 255, 0)


def test_cmyk_tiff_and_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert load_file(tmp_path, img, "c.tif").getpixel((3, 3)) == (255, 0, 0)
    jpeg = load_file(tmp_path, img, "c.jpg", quality=95)
    assert jpeg.size == (16, 8)
    r, g, b = jpeg.getpixel((3, 3))
    assert r > 240 and g < 15 and b < 15


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    path = tmp_path / "g16.png"
    img.save(path)
    assert Image.open(path).mode.startswith("I")
    out = ImageRef(path=path).load()
    # Reference: 8-bit value = round(v / 257); PIL's plain convert would give 255 for anything above 255.
    expected = [round(v / 257) for v in arr[0].tolist()]
    assert [out.getpixel((x, 0))[0] for x in range(4)] == expected
    assert out.getpixel((1, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(tmp_path, mode):
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (200, 40, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    img = rgba if mode == "RGBA" else rgba.convert("LA")
    out = load_file(tmp_path, img, f"{mode}.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent black -> white
    if mode == "RGBA":
        assert out.getpixel((1, 0)) == (200, 40, 0)
    # Half-transparent black over white: 255 * (1 - 128/255) = 127.
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_file(tmp_path, img, "rot.jpg", exif=exif.tobytes(), quality=95)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # the stored left edge is the displayed top
    assert bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    out = ImageRef(path=path).load()
    assert out.size == (10, 6)
    assert out.getpixel((4, 3)) == (255, 0, 0)


def test_one_bit_and_bytes_ref():
    img = Image.new("1", (5, 5), 1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = ImageRef(data=buf.getvalue()).load()
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (255, 255, 255)


def test_declared_huge_png_rejected_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(50_000, 50_000))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"decompression-bomb.*2500000000 pixels"):  # PIL's check, inside open()
        open_image(ImageRef(path=path))
    assert time.perf_counter() - start < 1.0
    # Decoding would need 7.5 GB; peak RSS (KiB on Linux) must not move by more than a few MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000


def test_own_pixel_limit_checked_from_header(tmp_path):
    path = tmp_path / "large.png"
    path.write_bytes(png_declaring(9_000, 9_000))  # 8.1e7: under PIL's thresholds, over our default 8192^2
    with pytest.raises(ImageError, match=r"9000x9000 = 81,000,000 pixels, above the limit of 67,108,864.*not decoded"):
        open_image(ImageRef(path=path))
    with pytest.raises(ImageError, match=r"above the limit of 1,000"):
        open_image(ImageRef(data=_png_bytes(Image.new("RGB", (40, 30)))), max_pixels=1000)


def test_pil_decompression_bomb_warning_is_an_error(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(10_000, 10_000))  # 1e8 pixels: above PIL's warning threshold (~8.9e7)
    assert 10_000 * 10_000 > Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="decompression-bomb"):
        open_image(ImageRef(path=path), max_pixels=10**10)


def test_truncated_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        data = buf.getvalue()
        ImageRef(data=data).load()  # the whole file is fine
        with pytest.raises(ImageError, match="truncated|broken|unreadable"):
            ImageRef(data=data[: len(data) // 2]).load()


def test_aspect_ratio_and_min_side(tmp_path):
    ref = ImageRef(data=_png_bytes(Image.new("RGB", (402, 2))))
    with pytest.raises(ImageError, match="aspect ratio 201.0"):
        open_image(ref, max_aspect_ratio=200.0)
    assert open_image(ref, max_aspect_ratio=None).size == (402, 2)
    with pytest.raises(ImageError, match="below the minimum of 3"):
        open_image(ref, min_side=3)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
