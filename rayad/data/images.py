"""The one pre-processing path: decode, convert to RGB, resize. Train, evaluate, predict and serve all call it."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from rayad.errors import DataError

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
# Pillow refuses images over twice its Image.MAX_IMAGE_PIXELS in Image.open, before rayad's own limit is checked:
# the highest that limit can go
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# What Pillow may decode: only these formats. Pillow opens dozens more, and some run other programs on what a
# client uploads (EPS runs Ghostscript where it is installed).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")


class ImageTooLarge(DataError):
    """An image over the pixel limit: a possible decompression bomb, refused before it is decoded."""


def decode_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image from a path, bytes or a binary file; raises DataError naming the source
    (a path, else "<bytes>") if it is bad."""
    name = str(source) if isinstance(source, str | Path) else "<bytes>"
    encoded = isinstance(source, bytes | bytearray | memoryview)
    if not (encoded or isinstance(source, str | Path) or hasattr(source, "read")):
        raise DataError(f"a {type(source).__name__}: not an image path, encoded bytes or a binary file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, just below
            image = Image.open(io.BytesIO(source) if encoded else source, formats=IMAGE_FORMATS)
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is over the limit of "
                                    f"{max_pixels:,}")
            image.load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except Image.UnidentifiedImageError:  # its message names the file object: <_io.BytesIO object at 0x…>
        raise DataError(f"{name}: not a readable image (rayad reads PNG, JPEG, BMP, TIFF and WebP)") from None
    except Image.DecompressionBombError:  # Pillow's own limit, met first
        raise ImageTooLarge(f"{name}: over the pixel limit of {PILLOW_MAX_PIXELS:,}, Pillow's own (a possible "
                            "decompression bomb)") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many kinds (TypeError, NotImplementedError,
        # struct.error, ...) on crafted files: whatever the kind, the file is no image rayad can read
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    if image.mode == "F":
        raise DataError(f"{name}: a 32-bit float image has no fixed conversion to 8 bits; save it with 8 or 16 "
                        "bits per sample")
    return image


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """Convert to RGB and resize to size x size; returns uint8 (H, W, 3). One rule for every bit depth and
    mode: a sample keeps its 8 most significant bits (16-bit v becomes v >> 8, as Pillow does for 16-bit
    RGB; 32-bit integers are clipped to 16 bits first), grayscale is replicated, alpha dropped. So a
    picture scores the same whether it is stored with 8 or 16 bits."""
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I
        arr = np.asarray(image)  # in its own dtype: a 64-bit copy took 25 bytes a pixel (GBs for a large image)
        if arr.dtype.kind == "i":
            arr = np.clip(arr, 0, min(65535, np.iinfo(arr.dtype).max))
        image = Image.fromarray((arr >> 8).astype(np.uint8))
    elif image.mode == "La":  # premultiplied alpha (a TIFF's), which Pillow converts only to LA
        image = image.convert("LA")
    if image.mode != "L":  # grayscale is resized first (the same pixels, without three full-size channels)
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


def image_size(content: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image that `decode_image` has read: from its header, without decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(content), formats=IMAGE_FORMATS).size


def load_image(source: str | Path | bytes | BinaryIO, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode and pre-process one image: uint8 (size, size, 3)."""
    return to_rgb_array(decode_image(source, max_pixels), size)


def load_mask(path: str | Path, size: int, expected_hw: tuple[int, int] | None = None,
              max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Load a ground-truth mask as bool (size, size); `expected_hw` checks it matches its image. Every pixel
    that is not 0 marks a defect: masks stored as 0/255 (MVTec), as 0/1 (VisA's originals) or as palette
    indices read alike."""
    image = decode_image(path, max_pixels)
    if expected_hw is not None and (image.height, image.width) != expected_hw:
        raise DataError(f"{path}: mask is {image.width}x{image.height} but its image is "
                        f"{expected_hw[1]}x{expected_hw[0]}")
    if image.mode == "P":  # palette indices, not their colours: a dark defect colour is still a defect
        image = Image.fromarray(np.asarray(image))
    if image.mode in ("RGB", "RGBA", "RGBX"):  # any colour channel not 0: grayscale rounds (1, 0, 0) to 0
        mask = np.asarray(image)[..., :3].any(axis=-1)
        if not mask.any() and _sixteen_bit_colour_png(path, image):
            raise DataError(f"{path}: a 16-bit colour PNG, which Pillow reads by its high bytes only: a mask of "
                            "values under 256 (0/1) reads as empty; store it as grayscale")
        return _resized_mask(mask, size)
    try:
        mask = np.asarray(image.convert("L")) > 0
    except ValueError as e:  # a mode Pillow cannot bring to grayscale (LAB)
        raise DataError(f"{path}: a {image.mode} image, which has no grayscale for a mask ({e})") from None
    return _resized_mask(mask, size)


def _sixteen_bit_colour_png(path: str | Path, image: Image.Image) -> bool:
    """A PNG of 16-bit RGB(A) or grey + alpha samples, which Pillow opens as 8-bit RGB(A): its header (IHDR's bit
    depth and colour type, bytes 24 and 25) says so."""
    if image.format != "PNG" or image.mode not in ("RGB", "RGBA"):
        return False
    with open(path, "rb") as f:
        header = f.read(26)
    return len(header) == 26 and header[24] == 16 and header[25] in (2, 4, 6)


def _resized_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside `directory`, sorted. Hidden files are left out (macOS copies `._001.png` beside
    each image, which is no image); a link to nothing is kept, to be named where it is read."""
    return sorted(utf8_path(p) for p in directory.iterdir() if not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES and file_or_broken_link(p))


def file_or_broken_link(path: Path) -> bool:
    """Whether a listed image is one: a file, or a link to nothing, which the reader names (leaving it out hid it)."""
    return path.is_file() or path.is_symlink() and not path.exists()


def utf8_path(path: Path) -> Path:
    """`path`, whose name must be valid UTF-8: manifests, predictions and served results store paths as text."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise DataError(f"{shown}: the file name is not valid UTF-8; rename it") from None
    return path
