"""The one pre-processing path: decode, convert to RGB, resize. Train, evaluate, predict and serve all call it."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from rayad.errors import DataError

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageTooLarge(DataError):
    """An image over the pixel limit: a possible decompression bomb, refused before it is decoded."""


def decode_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image from a path or bytes; raises DataError naming the source if it is bad."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is over the limit of "
                                    f"{max_pixels:,}")
            image.load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except Image.UnidentifiedImageError:  # its message names the file object: <_io.BytesIO object at 0x…>
        raise DataError(f"{name}: not a readable image (unknown format, or not an image)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: not a readable image ({e})") from None
    return image


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """Convert to RGB (grayscale is replicated) and resize to size x size; returns uint8 (H, W, 3)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):  # 16-bit or float grayscale: scale to 8 bit
        arr = np.asarray(image, dtype=np.float32)
        arr = 255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
        image = Image.fromarray(arr.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


def load_image(source: str | Path | bytes, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode and pre-process one image: uint8 (size, size, 3)."""
    return to_rgb_array(decode_image(source, max_pixels), size)


def load_mask(path: str | Path, size: int, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Load a ground-truth mask as bool (size, size); `expected_hw` checks it matches its image."""
    image = decode_image(path)
    if expected_hw is not None and (image.height, image.width) != expected_hw:
        raise DataError(f"{path}: mask is {image.width}x{image.height} but its image is "
                        f"{expected_hw[1]}x{expected_hw[0]}")
    mask = image.convert("L").resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(mask) > 127


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside `directory`, sorted."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
