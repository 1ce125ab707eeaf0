"""Demo dataset in the MVTec AD layout, cut from the real texture photographs that scikit-image ships.

Training crops come from the top of each photograph, test crops from the bottom (disjoint regions), and
test defects are painted by `rayad.data.defects`.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from tqdm import tqdm

from rayad.data.defects import DEFECTS, paint_defect

CATEGORIES = ("brick", "grass", "gravel")
CROP = 128
TRAIN_ROWS = (0, 320)  # the photographs are 512 x 512; rows 320..335 are left unused as a margin
TEST_ROWS = (336, 512)


def make_demo_dataset(out: str | Path, seed: int = 0, n_train: int = 120, n_test_good: int = 20,
                      n_per_defect: int = 8, categories: tuple[str, ...] = CATEGORIES) -> Path:
    """Write ROOT/<category>/{train/good, test/<type>, ground_truth/<type>} and return ROOT."""
    out = Path(out)
    for category in tqdm(categories, desc="demo data", unit="category"):
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        photo = getattr(skimage.data, category)()
        base = out / category
        for i in range(n_train):
            _save(base / "train" / "good" / f"{i:03d}.png", _crop(photo, TRAIN_ROWS, rng))
        for i in range(n_test_good):
            _save(base / "test" / "good" / f"{i:03d}.png", _crop(photo, TEST_ROWS, rng))
        for kind in DEFECTS:
            for i in range(n_per_defect):
                image, mask = paint_defect(_crop(photo, TEST_ROWS, rng), kind, rng)
                _save(base / "test" / kind / f"{i:03d}.png", image)
                _save(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return out


def _crop(photo: np.ndarray, rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(rows[0], rows[1] - CROP + 1))
    left = int(rng.integers(0, photo.shape[1] - CROP + 1))
    return photo[top:top + CROP, left:left + CROP]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=True)
