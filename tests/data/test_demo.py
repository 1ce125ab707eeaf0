from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import ndimage

from rayad.config import DataConfig
from rayad.data.defects import DEFECTS, paint_defect
from rayad.data.demo import CATEGORIES, CROP, TEST_ROWS, TRAIN_ROWS, make_demo_dataset
from rayad.data.layouts import detect_layout
from rayad.data.manifest import build_manifest

SMALL = {"n_train": 4, "n_test_good": 2, "n_per_defect": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("small"), seed=5, **SMALL)


def pngs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png"))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def locate(photo: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """All (top, left) where `crop` appears exactly in `photo`."""
    h, w = crop.shape
    rows = sliding_window_view(photo, w, axis=1)  # (H, W - w + 1, w)
    candidates = np.argwhere((rows == crop[0]).all(axis=-1))
    return [(int(t), int(left)) for t, left in candidates
            if t + h <= photo.shape[0] and np.array_equal(photo[t:t + h, left:left + w], crop)]


def test_demo_writes_mvtec_layout(demo_root):
    assert sorted(p.name for p in demo_root.iterdir()) == sorted(CATEGORIES) == ["brick", "grass", "gravel"]
    def names(n):
        return [f"{i:03d}.png" for i in range(n)]

    for category in CATEGORIES:
        base = demo_root / category
        assert pngs(base / "train" / "good") == names(12)
        assert pngs(base / "test" / "good") == names(4)
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted([*DEFECTS, "good"])
        for kind in DEFECTS:
            assert pngs(base / "test" / kind) == names(2)
            assert pngs(base / "ground_truth" / kind) == ["000_mask.png", "001_mask.png"]


def test_demo_is_a_valid_mvtec_dataset(demo_root):
    for category in CATEGORIES:
        assert detect_layout(demo_root, category) == "mvtec"
        rows = build_manifest(demo_root, category, DataConfig(val_fraction=0.0)).to_pylist()
        anomalous = [r for r in rows if r["label"] == 1]
        assert len(anomalous) == 2 * len(DEFECTS)
        assert {r["defect_type"] for r in anomalous} == set(DEFECTS)
        assert all(r["mask_path"] is not None for r in anomalous)


def test_demo_masks_nonempty_and_same_size(demo_root):
    for category in CATEGORIES:
        for kind in DEFECTS:
            for image_path in (demo_root / category / "test" / kind).glob("*.png"):
                image = Image.open(image_path)
                mask = Image.open(demo_root / category / "ground_truth" / kind / f"{image_path.stem}_mask.png")
                assert image.size == mask.size == (CROP, CROP)
                values = np.asarray(mask)
                assert set(np.unique(values)) <= {0, 255}
                assert values.any(), f"empty mask for {image_path}"


def test_demo_same_seed_is_byte_identical(small, tmp_path):
    again = make_demo_dataset(tmp_path, seed=5, categories=("brick",), **SMALL)
    brick = files(again / "brick")
    assert len(brick) == SMALL["n_train"] + SMALL["n_test_good"] + 2 * len(DEFECTS)
    assert brick == files(small / "brick")


def test_demo_different_seed_differs(small, demo_root):
    for category in CATEGORIES:
        for name in pngs(small / category / "train" / "good"):
            seed5 = (small / category / "train" / "good" / name).read_bytes()
            seed0 = (demo_root / category / "train" / "good" / name).read_bytes()
            assert seed5 != seed0


def test_train_and_test_rows_are_disjoint():
    assert 0 <= TRAIN_ROWS[0] < TRAIN_ROWS[1] <= TEST_ROWS[0] < TEST_ROWS[1] <= 512
    assert TRAIN_ROWS[1] - TRAIN_ROWS[0] >= CROP and TEST_ROWS[1] - TEST_ROWS[0] >= CROP


def test_crops_come_from_their_rows(demo_root):
    for category in CATEGORIES:
        photo = getattr(skimage.data, category)()
        for split, (lo, hi) in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
            for path in sorted((demo_root / category / split / "good").glob("*.png"))[:4]:
                found = locate(photo, np.asarray(Image.open(path)))
                assert found, f"{path} not found in the {category} photo"
                assert all(lo <= top and top + CROP <= hi for top, _ in found), (path, found)


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_paint_defect_only_changes_pixels_near_mask(kind):
    photo = skimage.data.brick()
    image = photo[TEST_ROWS[0]:TEST_ROWS[0] + CROP, 100:100 + CROP].copy()
    original = image.copy()
    for seed in range(12):
        out, mask = paint_defect(image, kind, np.random.default_rng(seed))
        assert np.array_equal(image, original)
        assert out.dtype == np.uint8 and out.shape == image.shape and mask.shape == image.shape
        assert mask.dtype == bool and mask.any()
        changed = out != image
        assert changed[mask].mean() > 0.9
        far = ~ndimage.binary_dilation(mask, iterations=3)
        assert not (changed & far).any(), f"{kind} seed {seed}: {int((changed & far).sum())} far pixels changed"


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_paint_defect_is_seeded(kind):
    image = skimage.data.gravel()[TEST_ROWS[0]:TEST_ROWS[0] + CROP, :CROP]
    a = paint_defect(image, kind, np.random.default_rng(3))
    b = paint_defect(image, kind, np.random.default_rng(3))
    c = paint_defect(image, kind, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
