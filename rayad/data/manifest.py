"""The manifest: one Arrow row per image (path, split, label, defect_type, mask_path), saved as Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayad.config import DataConfig
from rayad.data.layouts import READERS, Row, detect_layout
from rayad.errors import DataError
from rayad.layout import atomic_write

MIN_VAL_IMAGES = 2  # the calibration's score statistics (a mean and a standard deviation) need two good images
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("split", pa.string()),
    ("label", pa.int8()),
    ("defect_type", pa.string()),
    ("mask_path", pa.string()),
])


def build_manifest(root: str | Path, category: str, cfg: DataConfig | None = None) -> pa.Table:
    """Read a dataset layout into a manifest with train / val / test splits."""
    check_category(category)
    cfg = cfg or DataConfig()
    root = Path(root)
    layout = detect_layout(root, category) if cfg.layout == "auto" else cfg.layout
    rows = READERS[layout](root, category, cfg)
    if not any(r.split == "train" for r in rows):
        raise DataError(f"{root / category}: no training images found ({layout} layout)")
    _check_masks(rows)
    if not any(r.split == "val" for r in rows):
        rows = _carve_validation(rows, cfg.val_fraction, cfg.split_seed)
    return pa.Table.from_pylist([r.__dict__ for r in rows], schema=SCHEMA)


def check_category(category: object) -> None:
    if not isinstance(category, str):
        raise TypeError(f"category: the name of a folder under the data root, not {category!r}")
    if not category.strip() or category in (".", "..") or "/" in category:
        raise DataError(f"category {category!r}: must name a folder under the data root")


def split_rows(manifest: pa.Table, split: str) -> pa.Table:
    return manifest.filter(pc.equal(manifest["split"], split))


def save_manifest(manifest: pa.Table, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: pq.write_table(manifest, tmp))


def load_manifest(path: str | Path) -> pa.Table:
    try:
        return pq.read_table(path, schema=SCHEMA)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: damaged ({e}); it lists the images the run was trained on") from None


def same_images(saved: pa.Table, new: pa.Table, data_root: str | Path) -> bool:
    """Whether `new` (read from `data_root`) lists the images of `saved` in the same splits, wherever the
    dataset lay then: each path is compared by its parts below the data root, the category's folder included."""
    columns = ["split", "label", "defect_type"]
    if saved.num_rows != new.num_rows or not saved.select(columns).equals(new.select(columns)):
        return False
    root = Path(data_root)
    for before, now in zip(saved["path"].to_pylist(), new["path"].to_pylist(), strict=True):
        tail = Path(now).relative_to(root).parts if Path(now).is_relative_to(root) else Path(now).parts
        if Path(before).parts[-len(tail):] != tail:
            return False
    return True


def _carve_validation(rows: list[Row], fraction: float, seed: int) -> list[Row]:
    """Move a seeded `fraction` of the training images to "val": when fraction > 0, at least MIN_VAL_IMAGES (the
    calibration's score statistics need two) and never every one."""
    train = [i for i, r in enumerate(rows) if r.split == "train"]
    carved = min(len(train) - 1, max(MIN_VAL_IMAGES, int(round(fraction * len(train)))))
    n_val = carved if fraction > 0 and len(train) > MIN_VAL_IMAGES else 0
    val = {train[i] for i in np.random.default_rng(seed).permutation(len(train))[:n_val]}
    return [Row(r.path, "val", r.label, r.defect_type, r.mask_path) if i in val else r for i, r in enumerate(rows)]


def _check_masks(rows: list[Row]) -> None:
    """Either no anomalous image has a mask (pixel metrics are skipped) or all have one."""
    anomalous = [r for r in rows if r.label == 1]
    missing = [r.path for r in anomalous if r.mask_path is None]
    if missing and len(missing) < len(anomalous):
        listed = "\n  ".join(missing)
        raise DataError(f"{len(missing)} anomalous image(s) have no ground-truth mask:\n  {listed}")
