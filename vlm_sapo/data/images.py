"""Opening images safely and turning every image into the same 8-bit RGB picture.

Everything that feeds pixels to a model (validation, rollout, learner, eval) goes through `open_image`, so the
decompression-bomb guard, the truncation check and the RGB conversion rules below hold everywhere:

- size guard before decoding: the header's declared width x height is checked against `max_pixels` right after
  `Image.open` (which reads the header only), so a 50,000 x 50,000 PNG is rejected without allocating its pixels;
  PIL's own `DecompressionBombWarning` is raised as an error too;
- full decode (`Image.load()`), so truncated files fail here, not in the middle of a rollout;
- first frame only for animated images (GIF, APNG, WebP);
- EXIF orientation applied (`ImageOps.exif_transpose`), so the model sees the picture the way a viewer shows it;
- alpha (RGBA, LA, PA, a palette or colour-key transparency) composited on white, because a transparent diagram background
  would otherwise turn black;
- 16/32-bit integer greyscale scaled to 8 bit (`value / 257`), not clipped at 255 as PIL's `convert` does;
  float images are clipped to [0, 1] and scaled by 255;
- everything else (palette, CMYK, 1-bit, YCbCr, ...) via PIL's `convert("RGB")`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# 8192 x 8192: a decoded RGB image of this size takes 192 MiB; anything larger is downscaled by smart_resize anyway.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# qwen-vl-utils' and transformers' smart_resize raise above this aspect ratio.
DEFAULT_MAX_ASPECT_RATIO = 200.0
# smart_resize rounds each side up to one patch factor and upscales to min_pixels, so even 1-pixel sides are legal.
DEFAULT_MIN_SIDE = 1


class ImageError(ValueError):
    """One image cannot be used; the message says why (the caller adds file, row and column)."""


@dataclass(frozen=True)
class ImageRef:
    """A not-yet-decoded image: a file path or encoded bytes, opened on demand by `load()`.

    Keeps big datasets out of memory; `max_pixels` travels with the ref so a file swapped after validation is still
    guarded when it is finally decoded.
    """

    path: Path | None = None
    data: bytes | None = None
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path or data")

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self.data or b'')} bytes>"

    def load(self) -> Image.Image:
        """Decode to an 8-bit RGB image (see the module docstring for the rules)."""
        return open_image(self, max_pixels=self.max_pixels)


def _open_source(ref: ImageRef) -> Image.Image:
    if ref.path is not None:
        if not ref.path.is_file():
            raise ImageError(f"image file not found: {ref.path}")
        if ref.path.stat().st_size == 0:
            raise ImageError(f"image file is empty (0 bytes): {ref.path}")
        return Image.open(ref.path)
    if not ref.data:
        raise ImageError("image bytes are empty")
    return Image.open(io.BytesIO(ref.data))


def open_image(
    ref: ImageRef,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Open, guard, fully decode and convert one image to RGB; raises `ImageError` with the reason."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another library): truncated images "
                         "would load silently; set it back to False")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_source(ref)
            try:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"image declares {width}x{height} = {width * height:,} pixels, above the "
                                     f"limit of {max_pixels:,} (decompression-bomb guard); not decoded")
                if min(width, height) < min_side:
                    raise ImageError(f"image is {width}x{height}, a side below the minimum of {min_side} pixels")
                ratio = max(width, height) / max(min(width, height), 1)
                if max_aspect_ratio is not None and ratio > max_aspect_ratio:
                    raise ImageError(f"image is {width}x{height}, aspect ratio {ratio:.1f} above "
                                     f"{max_aspect_ratio:g} (Qwen's smart_resize rejects it)")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                return to_rgb(img)
            finally:
                img.close()
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(f"decompression-bomb guard: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"not a readable image ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # PIL reports corrupt data with all of these
        raise ImageError(f"unreadable or truncated image: {type(err).__name__}: {err}") from err


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image to 8-bit RGB, EXIF orientation applied; always returns a new image."""
    img = ImageOps.exif_transpose(img)  # a copy in Pillow >= 9.4, also when there is nothing to rotate
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _composite_on_white(img)
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, ...: 16-bit greyscale PNG/TIFF
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255.0
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")
