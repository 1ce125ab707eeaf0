"""Dataset layouts (MVTec AD, MVTec AD 2, VisA, plain folders) read into manifest rows.

Each reader returns a list of `Row`s with split "train" or "test"; `manifest.build_manifest` carves the
validation split and checks the result.
"""

from __future__ import annotations

import csv
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rayad.config import DataConfig
from rayad.data.images import list_images
from rayad.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    path: str
    split: str  # train | val | test
    label: int  # 0 good, 1 anomalous
    defect_type: str
    mask_path: str | None = None


def read_mvtec(root: Path, category: str, cfg: DataConfig) -> list[Row]:
    """ROOT/<category>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}, and optionally
    validation/good: held-out good images (as in MVTec AD 2), used instead of carving data.val_fraction."""
    base = _category_dir(root, category, required=("train/good", "test"))
    rows = [Row(str(p), "train", 0, "good") for p in list_images(base / "train" / "good")]
    validation = base / "validation" / "good"
    rows += [Row(str(p), "val", 0, "good") for p in list_images(validation)] if validation.is_dir() else []
    for defect_dir in sorted(d for d in (base / "test").iterdir() if d.is_dir() and not d.name.startswith(".")):
        defect, images = defect_dir.name, list_images(defect_dir)
        masks = [None] * len(images) if defect == "good" else _find_masks(base / "ground_truth" / defect, images)
        rows += [Row(str(p), "test", int(defect != "good"), defect, m) for p, m in zip(images, masks, strict=True)]
    return rows


def read_mvtec2(root: Path, category: str, cfg: DataConfig) -> list[Row]:
    """ROOT/<category>/{train/good, validation/good, test_public/{good,bad}, test_public/ground_truth/bad}."""
    base = _category_dir(root, category, required=("train/good", "validation/good", "test_public"))
    rows = [Row(str(p), "train", 0, "good") for p in list_images(base / "train" / "good")]
    rows += [Row(str(p), "val", 0, "good") for p in list_images(base / "validation" / "good")]
    test = base / "test_public"
    rows += [Row(str(p), "test", 0, "good") for p in list_images(test / "good")] if (test / "good").is_dir() else []
    bad = list_images(test / "bad") if (test / "bad").is_dir() else []
    masks = _find_masks(test / "ground_truth" / "bad", bad)
    return rows + [Row(str(p), "test", 1, "bad", m) for p, m in zip(bad, masks, strict=True)]


def read_visa(root: Path, category: str, cfg: DataConfig) -> list[Row]:
    """VisA: ROOT/split_csv/1cls.csv with columns object, split, label, image, mask (paths relative to ROOT)."""
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        raise DataError(f"{split_csv}: VisA split file not found")
    try:
        with split_csv.open(newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark, as Excel writes
            reader = csv.DictReader(f)
            records = [(reader.line_num, record) for record in reader]  # the line a record ends on
    except UnicodeDecodeError:
        raise DataError(f"{split_csv}: not UTF-8 text") from None
    except csv.Error as e:  # a stray quote can make one field swallow the rest of the file
        raise DataError(f"{split_csv}: not a readable CSV file ({e})") from None
    missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"{split_csv}: missing column(s) {sorted(missing)}")
    first_line = {}
    for line, r in records:
        if any(r[k] is None for k in ("object", "split", "label", "image", "mask")):
            raise DataError(f"{split_csv}, line {line}: fewer fields than the header")
        if r["split"] not in VISA_SPLITS or r["label"].strip().lower() not in VISA_LABELS:
            raise DataError(f"{split_csv}, line {line}: split {r['split']!r} and label {r['label']!r} must be "
                            f"one of {VISA_SPLITS} and one of {VISA_LABELS}")
        if r["split"] == "train" and r["label"].strip().lower() == "anomaly":
            raise DataError(f"{split_csv}, line {line}: an anomaly in split train; rayad trains on normal images "
                            "only (put it in split test)")
        if not r["image"].strip():  # else the row names the dataset's root, read as an image
            raise DataError(f"{split_csv}, line {line}: no image path")
        if first_line.setdefault(r["image"], line) != line:  # trained on twice, or scored as well as trained on
            raise DataError(f"{split_csv}, line {line}: image {r['image']} is listed on line {first_line[r['image']]} "
                            "too; list each image once")
    categories = sorted({r["object"] for _, r in records})
    if category not in categories:
        raise DataError(f"category '{category}' not in {split_csv}; categories: {', '.join(categories)}")
    rows = []
    for r in (r for _, r in records if r["object"] == category):
        label = int(r["label"].strip().lower() == "anomaly")
        mask = str(root / r["mask"]) if label and r["mask"] else None
        split = "test" if r["split"] == "test" else "train"
        rows.append(Row(str(root / r["image"]), split, label, "anomaly" if label else "good", mask))
    return rows


VISA_SPLITS, VISA_LABELS = ("train", "test"), ("normal", "anomaly")


def read_folder(root: Path, category: str, cfg: DataConfig) -> list[Row]:
    """ROOT/<category>/{normal_dir, abnormal_dir, [mask_dir]}; a seeded share of normal images goes to test."""
    base = _category_dir(root, category, required=(cfg.normal_dir,))
    folders = {"data.normal_dir": cfg.normal_dir, "data.abnormal_dir": cfg.abnormal_dir, "data.mask_dir": cfg.mask_dir}
    for (key, folder), (other, other_folder) in itertools.combinations(folders.items(), 2):
        if folder and other_folder and (base / folder).resolve() == (base / other_folder).resolve():
            raise DataError(f"{key} and {other} are the same folder ({base / folder}); each needs its own")
    normal = list_images(base / cfg.normal_dir)
    n_test = int(round(cfg.test_fraction * len(normal)))
    order = np.random.default_rng(cfg.split_seed).permutation(len(normal))
    test_idx = set(order[:n_test].tolist())
    rows = [Row(str(p), "test" if i in test_idx else "train", 0, "good") for i, p in enumerate(normal)]
    abnormal_dir = base / cfg.abnormal_dir
    defects = list_images(abnormal_dir) if abnormal_dir.is_dir() else []
    if not defects:
        log.warning("%s holds no images (data.abnormal_dir): the test split has no defects, so image metrics "
                    "cannot be computed", abnormal_dir)
    if cfg.mask_dir and not (base / cfg.mask_dir).is_dir():
        raise DataError(f"{base / cfg.mask_dir}: mask folder (data.mask_dir) not found")
    masks = _find_masks(base / cfg.mask_dir, defects) if cfg.mask_dir else [None] * len(defects)
    return rows + [Row(str(p), "test", 1, cfg.abnormal_dir, m) for p, m in zip(defects, masks, strict=True)]


READERS = {"mvtec": read_mvtec, "mvtec2": read_mvtec2, "visa": read_visa, "folder": read_folder}


def detect_layout(root: Path, category: str) -> str:
    """Guess the layout from marker paths; `folder` needs to be asked for explicitly."""
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if (root / category / "test_public").is_dir():
        return "mvtec2"
    if (root / category / "train" / "good").is_dir() or not (root / category).is_dir():
        return "mvtec"
    raise DataError(f"{root / category}: not an MVTec AD, MVTec AD 2 or VisA layout; for plain folders "
                    "pass --layout folder (or data.layout=folder)")


def _category_dir(root: Path, category: str, required: tuple[str, ...]) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: data root " + ("is a file, not a folder" if root.exists() else "not found"))
    base = root / category
    if not base.is_dir():
        existing = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise DataError(f"category '{category}' not found in {root}; categories: {', '.join(existing) or 'none'}")
    for sub in required:
        if not (base / sub).is_dir():
            raise DataError(f"{base / sub}: folder not found")
    return base


def _find_masks(mask_dir: Path, images: list[Path]) -> list[str | None]:
    """Each image's mask in `mask_dir` (`_find_mask`), or None. A folder of masks none of which is named after
    its images is refused: its pixel metrics would be dropped without a word."""
    masks = [_find_mask(mask_dir, p.stem) for p in images]
    if images and not any(masks) and mask_dir.is_dir() and list_images(mask_dir):
        stem = images[0].stem
        raise DataError(f"{mask_dir}: none of its masks is named after an image of {images[0].parent} (the mask of "
                        f"{images[0].name} is {stem}_mask.png or {stem}.png)")
    return masks


def _find_mask(mask_dir: Path, stem: str) -> str | None:
    for name in (f"{stem}_mask.png", f"{stem}.png", f"{stem}_mask.PNG", f"{stem}.PNG"):
        if (mask_dir / name).is_file():
            return str(mask_dir / name)
    return None
