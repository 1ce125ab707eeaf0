"""Demo dataset in the MVTec AD layout, cut from the real texture photographs that scikit-image ships.

Each 512² photograph is split into 8 tiles of 256 rows x 128 columns (two rows of four): train takes
four, validation two (written to `validation/good`, the MVTec AD 2 convention, which rayad's mvtec layout
reads as the validation split) and test two. The photographs are not stationary (gravel's stones grow
from top to bottom with the perspective, and a model scores the inner columns higher), so every split
holds a tile in the top and in the bottom half, on the left and on the right, in an inner and in an
outer column, and the validation tiles mirror the test tiles left to right. Every 128² crop lies inside
one tile of its split: no two splits share a pixel, so held-out good images are as unseen as test
images, as on a production line. Crops are flipped and rotated by multiples of 90° where the material
allows it (`TRANSFORMS`). Test defects are painted by `rayad.data.defects`, every kind `n_per_defect`
times.
"""

from __future__ import annotations

import itertools
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from tqdm import tqdm

from rayad.config import MAX_SEED
from rayad.data.defects import DEFECTS, paint_defect
from rayad.data.manifest import MIN_VAL_IMAGES
from rayad.errors import RayadError

CATEGORIES = ("brick", "grass", "gravel")
CROP = 128
TILE = (256, 128)  # rows, columns: 2 x 4 tiles cover the 512² photographs
LAYOUT = (("train", "val", "test", "train"),  # top half, left to right
          ("test", "train", "train", "val"))  # bottom half
SPLIT_OF_TILE = {(r, c): split for r, row in enumerate(LAYOUT) for c, split in enumerate(row)}

# (quarter turns, left-right flip). Brick courses run one way in its photograph: flips only, no 90° turns.
DIHEDRAL = tuple((k, flip) for k in range(4) for flip in (False, True))
FLIPS = ((0, False), (0, True), (2, False), (2, True))
TRANSFORMS = {"brick": FLIPS, "grass": DIHEDRAL, "gravel": DIHEDRAL}


def make_demo_dataset(out: str | Path, seed: int = 0, n_train: int = 240, n_test_good: int = 60,
                      n_per_defect: int = 25, categories: tuple[str, ...] = CATEGORIES, n_val: int | None = None
                      ) -> Path:
    """Write ROOT/<category>/{train/good, validation/good, test/<type>, ground_truth/<type>} and return ROOT;
    `n_val` good validation images (default: a fifth of `n_train`, at least MIN_VAL_IMAGES)."""
    if not 0 <= seed <= MAX_SEED:
        raise RayadError(f"demo seed {seed}: must be from 0 to {MAX_SEED}")
    n_val = max(MIN_VAL_IMAGES, n_train // 5) if n_val is None else n_val
    out = Path(out)
    for category in tqdm(categories, desc="demo data", unit="category"):
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        photo = getattr(skimage.data, category)()
        transforms = TRANSFORMS.get(category, ((0, False),))
        # a new category's folder appears whole: a stopped run leaves a hidden one, which the next run writes anew
        target = out / category
        base = target if target.is_dir() else out / f".{category}.partial"
        if base != target:
            shutil.rmtree(base, ignore_errors=True)
        train, val, test = (tile_crops(photo, split, transforms, rng) for split in ("train", "val", "test"))
        for i in range(n_train):
            _save(base / "train" / "good" / f"{i:03d}.png", next(train))
        for i in range(n_val):
            _save(base / "validation" / "good" / f"{i:03d}.png", next(val))
        for i in range(n_test_good):
            _save(base / "test" / "good" / f"{i:03d}.png", next(test))
        for kind in DEFECTS:
            for i in range(n_per_defect):
                image, mask = paint_defect(next(test), kind, rng)
                _save(base / "test" / kind / f"{i:03d}.png", image)
                _save(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        if base != target:
            base.rename(target)
    return out


def tiles(split: str) -> list[tuple[int, int]]:
    """(top, left) of the tiles of `split`."""
    return [(r * TILE[0], c * TILE[1]) for (r, c), s in SPLIT_OF_TILE.items() if s == split]


def tile_crops(photo: np.ndarray, split: str, transforms, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless random crops inside the tiles of `split`, visiting its tiles in turn, each flipped and
    rotated by a random one of `transforms`."""
    for tile_top, tile_left in itertools.cycle(tiles(split)):
        top, left = (int(rng.integers(0, size - CROP + 1)) for size in TILE)
        crop = photo[tile_top + top:tile_top + top + CROP, tile_left + left:tile_left + left + CROP]
        turns, flip = transforms[int(rng.integers(len(transforms)))]
        crop = np.rot90(crop, turns)
        yield crop[:, ::-1] if flip else crop


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, optimize=True)
