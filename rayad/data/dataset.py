"""Decoded, resized images of one split, cached on disk as one .npz file so loading is never the bottleneck."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rayad.data.images import MAX_IMAGE_PIXELS, decode_image, load_mask, to_rgb_array
from rayad.data.manifest import split_rows
from rayad.errors import DataError

log = logging.getLogger(__name__)
SKIP_HINT = "set data.on_bad_image=skip to skip them"


@dataclass
class ImageSet:
    """Images of one split: uint8 (N, H, W, 3), masks bool (N, H, W) or None, and their manifest rows."""

    images: np.ndarray
    masks: np.ndarray | None
    rows: pa.Table

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"].to_numpy().astype(np.int64)

    @property
    def defect_types(self) -> list[str]:
        return self.rows["defect_type"].to_pylist()

    def tensor(self) -> torch.Tensor:
        """Images as float (N, 3, H, W) in [0, 1]."""
        return to_tensor(self.images)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]. Any strides: a view such as `images[..., ::-1]`
    (BGR to RGB) is copied, as torch takes no negative strides."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def cache_dir() -> Path:
    return Path(os.environ.get("RAYAD_CACHE_DIR", Path.home() / ".cache" / "rayad"))


def load_split(manifest: pa.Table, split: str, size: int, on_bad_image: str = "error",
               max_pixels: int = MAX_IMAGE_PIXELS, *, skip_hint: str | None = SKIP_HINT) -> ImageSet:
    """Load (from cache when possible) the images and masks of `split` at `size` x `size`.

    Bad images (unreadable, corrupt, mask of the wrong size) are all listed in one DataError, or with
    on_bad_image="skip" dropped with a warning that lists them.
    """
    rows = split_rows(manifest, split)
    has_masks = any(m is not None for m in rows["mask_path"].to_pylist())
    path = cache_dir() / f"{_cache_key(rows, size, max_pixels)}.npz"
    cached = _read_cache(path, len(rows))
    if cached is None:
        cached = _decode_all(rows, size, max_pixels)
        _write_cache(path, *cached)
    images, masks, errors = cached
    keep = np.array([not e for e in errors], dtype=bool)
    if not keep.all():
        listed = "\n  ".join(e for e in errors if e)
        message = f"{(~keep).sum()} bad image(s) in the {split} split:\n  {listed}"
        if on_bad_image == "error":
            raise DataError(message + (f"\n({skip_hint})" if skip_hint else ""))
        log.warning("skipping %s", message)
    return ImageSet(images, masks if has_masks else None, rows.filter(keep))


def _decode_all(rows: pa.Table, size: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stacked images and masks of the readable rows, and per row "" or the error message."""
    images, masks, errors = [], [], []
    for path, mask_path in zip(rows["path"].to_pylist(), rows["mask_path"].to_pylist(), strict=True):
        try:
            image = decode_image(path, max_pixels)
            pixels = to_rgb_array(image, size)
            mask = np.zeros((size, size), bool)
            if mask_path:
                mask = load_mask(mask_path, size, (image.height, image.width), max_pixels)
        except DataError as e:
            errors.append(str(e))
            continue
        images.append(pixels)
        masks.append(mask)
        errors.append("")
    return (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            np.stack(masks) if masks else np.zeros((0, size, size), bool), errors)


def _cache_key(rows: pa.Table, size: int, max_pixels: int) -> str:
    """Changes when any path, file size or modification time changes, or the image size or pixel limit does
    (the version changes with the conversion rules of `rayad.data.images.to_rgb_array` and `load_mask`)."""
    h = hashlib.sha1(f"v4:{size}:{max_pixels}".encode())
    for p in rows["path"].to_pylist() + [m or "" for m in rows["mask_path"].to_pylist()]:
        stat = os.stat(p) if p and os.path.exists(p) else None
        h.update(f"{p}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}\n".encode())
    return h.hexdigest()[:20]


def _read_cache(path: Path, count: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The cached split, or None when it is missing or unreadable (truncated, corrupt: decoded again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            images, masks, errors = cached["images"], cached["masks"], cached["errors"].tolist()
    except Exception as e:  # noqa: BLE001 - a damaged file raises zipfile, OS or value errors
        log.warning("image cache %s is unreadable (%s); decoding the images again", path, e)
        return None
    if len(errors) != count or not len(images) == len(masks) == errors.count(""):  # bad images have no pixels
        log.warning("image cache %s does not match its split; decoding the images again", path)
        return None
    return images, masks, errors


def _write_cache(path: Path, images: np.ndarray, masks: np.ndarray, errors: list[str]) -> None:
    """Write atomically; a failure to cache (read-only disk, full disk) only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, masks=masks, errors=np.array(errors, dtype=str))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write image cache %s: %s", path, e)
