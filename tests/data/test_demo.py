from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from rayad.config import DataConfig
from rayad.data.defects import DEFECTS, LARGE_AREA, paint_defect, paint_defect_alpha
from rayad.data.demo import (
    CATEGORIES,
    CROP,
    DIHEDRAL,
    LAYOUT,
    SPLIT_OF_TILE,
    TILE,
    TRANSFORMS,
    make_demo_dataset,
    tiles,
)
from rayad.data.layouts import detect_layout
from rayad.data.manifest import build_manifest

SMALL = {"n_train": 4, "n_test_good": 2, "n_per_defect": 1}
GOOD = {"train": "train/good", "val": "validation/good", "test": "test/good"}  # where each split's good images are
PHOTO = 512
EIGHT = np.ones((3, 3))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("small"), seed=5, **SMALL)


def pngs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png"))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@functools.cache
def photo_of(category: str) -> tuple[np.ndarray, np.ndarray]:
    """The photograph and, at each (row, column), its next 8 pixels packed into one uint64."""
    photo = getattr(skimage.data, category)()
    return photo, np.ascontiguousarray(sliding_window_view(photo, 8, axis=1)).view(np.uint64)[..., 0]


def locate(category: str, crop: np.ndarray, valid: np.ndarray | None = None) -> list[tuple[int, int]]:
    """All (top, left) where `crop` appears exactly in the photo (on the `valid` pixels only, if given)."""
    photo, keys = photo_of(category)
    valid = np.ones(crop.shape, bool) if valid is None else valid
    h, w = crop.shape
    r, c = np.argwhere(sliding_window_view(valid, 8, axis=1).all(axis=-1))[0]  # 8 unmasked pixels in a row
    found = []
    for t, x in np.argwhere(keys == np.ascontiguousarray(crop[r, c:c + 8]).view(np.uint64)[0]):
        top, left = int(t - r), int(x - c)
        if 0 <= top <= photo.shape[0] - h and 0 <= left <= photo.shape[1] - w:
            patch = photo[top:top + h, left:left + w]
            if np.array_equal(patch[valid], crop[valid]):
                found.append((top, left))
    return found


def origins(category, image, valid=None) -> list[tuple[tuple[int, int], tuple[int, bool]]]:
    """((top, left), (quarter turns, flip)) of every transform of a photo crop that gives `image`."""
    out = []
    for turns, flip in DIHEDRAL:  # undo: flip back, then turn back
        def undo(a, turns=turns, flip=flip):
            return np.rot90(a[:, ::-1] if flip else a, -turns)
        for where in locate(category, undo(image), None if valid is None else undo(valid)):
            out.append((where, (turns, flip)))
    return out


def tile_of(top: int, left: int) -> tuple[int, int] | None:
    """The tile that holds the crop at (top, left) entirely, or None."""
    r, c = top // TILE[0], left // TILE[1]
    inside = top + CROP <= (r + 1) * TILE[0] and left + CROP <= (c + 1) * TILE[1]
    return (r, c) if inside and (r, c) in SPLIT_OF_TILE else None


def test_demo_writes_mvtec_layout(demo_root):
    assert sorted(p.name for p in demo_root.iterdir()) == sorted(CATEGORIES) == ["brick", "grass", "gravel"]

    def names(n):
        return [f"{i:03d}.png" for i in range(n)]

    for category in CATEGORIES:
        base = demo_root / category
        assert pngs(base / "train" / "good") == names(12)
        assert pngs(base / "validation" / "good") == names(2)  # a fifth of the training images
        assert pngs(base / "test" / "good") == names(4)
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted([*DEFECTS, "good"])
        for kind in DEFECTS:
            assert pngs(base / "test" / kind) == names(2)
            assert pngs(base / "ground_truth" / kind) == ["000_mask.png", "001_mask.png"]


def test_demo_is_a_valid_mvtec_dataset(demo_root):
    for category in CATEGORIES:
        assert detect_layout(demo_root, category) == "mvtec"
        rows = build_manifest(demo_root, category, DataConfig()).to_pylist()
        val = sorted(Path(r["path"]).name for r in rows if r["split"] == "val")
        assert val == pngs(demo_root / category / "validation" / "good"), "validation/good is the val split"
        anomalous = [r for r in rows if r["label"] == 1]
        assert len(anomalous) == 2 * len(DEFECTS)
        assert {r["defect_type"] for r in anomalous} == set(DEFECTS)
        assert all(r["mask_path"] is not None for r in anomalous)


def test_default_sizes_meet_the_benchmark_needs():
    defaults = {k: p.default for k, p in inspect.signature(make_demo_dataset).parameters.items()}
    assert defaults["n_test_good"] >= 60 and defaults["n_per_defect"] >= 25
    assert defaults["n_per_defect"] * len(DEFECTS) >= 150
    assert max(1, defaults["n_train"] // 5) >= 24 and defaults["n_val"] is None  # good validation images


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
    assert len(brick) == SMALL["n_train"] + 2 + SMALL["n_test_good"] + 2 * len(DEFECTS)  # 2 validation images
    assert brick == files(small / "brick")


def test_a_stopped_category_is_not_left_half_written_and_is_made_anew(small, tmp_path, monkeypatch):
    """A `rayad demo` stopped while it made its data had left a half category, which the next run took as made."""
    import rayad.data.demo as demo

    saved, save = [], demo._save

    def stopped_after_three(path: Path, array: np.ndarray) -> None:
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(path)
        save(path, array)

    monkeypatch.setattr(demo, "_save", stopped_after_three)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path, seed=5, categories=("brick",), **SMALL)
    assert not (tmp_path / "brick").exists() and (tmp_path / ".brick.partial").is_dir()  # hidden: no reader lists it
    monkeypatch.undo()
    make_demo_dataset(tmp_path, seed=5, categories=("brick",), **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["brick"] and files(tmp_path / "brick") == files(small / "brick")


def test_demo_different_seed_differs(small, demo_root):
    for category in CATEGORIES:
        for name in pngs(small / category / "train" / "good"):
            seed5 = (small / category / "train" / "good" / name).read_bytes()
            seed0 = (demo_root / category / "train" / "good" / name).read_bytes()
            assert seed5 != seed0


def test_tiles_are_disjoint_interleaved_and_hold_a_crop():
    assert min(TILE) >= CROP and len(LAYOUT) * TILE[0] == len(LAYOUT[0]) * TILE[1] == PHOTO
    owner = np.full((PHOTO, PHOTO), "", dtype=object)
    for split in GOOD:
        for top, left in tiles(split):
            assert (owner[top:top + TILE[0], left:left + TILE[1]] == "").all()
            owner[top:top + TILE[0], left:left + TILE[1]] = split
    assert (owner != "").all()  # the tiles cover the photograph
    columns = len(LAYOUT[0])
    for split in GOOD:  # every split spans the top and bottom half, left and right, inner and outer columns
        cells = [cell for cell, s in SPLIT_OF_TILE.items() if s == split]
        assert {r for r, _ in cells} == {0, 1}, split
        assert {c < columns // 2 for _, c in cells} == {True, False}, split
        assert {c in (0, columns - 1) for _, c in cells} == {True, False}, split
    mirrored = {(r, columns - 1 - c) for (r, c), s in SPLIT_OF_TILE.items() if s == "val"}
    assert mirrored == {cell for cell, s in SPLIT_OF_TILE.items() if s == "test"}
    assert [len(tiles(split)) for split in GOOD] == [4, 2, 2]


def test_good_crops_lie_inside_their_splits_tiles_and_share_no_pixel(demo_root):
    for category in CATEGORIES:
        covered = {}
        transforms = set()
        for split, folder in GOOD.items():
            covered[split] = np.zeros((PHOTO, PHOTO), bool)
            for path in sorted((demo_root / category / folder).glob("*.png")):
                found = origins(category, read(path))
                assert found, f"{path} is no flip or rotation of a crop of the {category} photo"
                for (top, left), transform in found:
                    assert SPLIT_OF_TILE.get(tile_of(top, left)) == split, (path, top, left)
                    assert transform in TRANSFORMS[category], (path, transform)
                    covered[split][top:top + CROP, left:left + CROP] = True
                    transforms.add(transform)
        for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
            assert not (covered[a] & covered[b]).any(), (category, a, b)
        assert len(transforms) > 2  # flipped and (but for brick) rotated, not just copied


def test_defects_are_painted_on_test_tiles(demo_root):
    for category in CATEGORIES:
        for kind in DEFECTS:
            image = read(demo_root / category / "test" / kind / "000.png")
            mask = read(demo_root / category / "ground_truth" / kind / "000_mask.png") > 0
            found = origins(category, image, ~mask)
            assert found, (category, kind)
            assert all(SPLIT_OF_TILE.get(tile_of(top, left)) == "test" for (top, left), _ in found)


def test_crops_cover_the_whole_photograph(tmp_path):
    root = make_demo_dataset(tmp_path, seed=1, n_train=10, n_test_good=8, n_per_defect=0, categories=("gravel",))
    used = set()
    for folder in GOOD.values():
        for path in sorted((root / "gravel" / folder).glob("*.png")):
            used |= {tile_of(*where) for where, _ in origins("gravel", read(path))}
    assert used == set(SPLIT_OF_TILE)  # every tile of every split is used


def _test_crop(photo: np.ndarray) -> np.ndarray:
    top, left = tiles("test")[0]
    return photo[top:top + CROP, left + 20:left + 20 + CROP].copy()


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_paint_defect_only_changes_pixels_near_mask(kind):
    image = _test_crop(skimage.data.brick())
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
    image = _test_crop(skimage.data.gravel())
    a = paint_defect(image, kind, np.random.default_rng(3))
    b = paint_defect(image, kind, np.random.default_rng(3))
    c = paint_defect(image, kind, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_paint_defect_alpha_is_the_opacity_behind_the_mask(kind):
    image = _test_crop(skimage.data.gravel())
    out, mask = paint_defect(image, kind, np.random.default_rng(5))
    same, alpha = paint_defect_alpha(image, kind, np.random.default_rng(5))
    assert np.array_equal(out, same) and np.array_equal(mask, alpha > 0)
    assert alpha.shape == mask.shape and alpha[mask].min() > 0.3 and alpha.max() <= 1


def _painted(kind: str, seeds=range(20)):
    image = _test_crop(skimage.data.grass())
    for seed in seeds:
        out, mask = paint_defect(image, kind, np.random.default_rng(seed))
        yield image, out, mask


@pytest.mark.parametrize("kind", LARGE_AREA)
def test_large_area_defects_cover_10_to_40_percent_in_one_region(kind):
    for _, _, mask in _painted(kind):
        assert 0.1 <= mask.mean() <= 0.4
        assert ndimage.label(mask, EIGHT)[1] == 1


def test_faint_defects_are_large_and_a_few_grey_levels_deep():
    for image, out, mask in _painted("faint"):
        change = np.abs(out.astype(int) - image)
        assert 0.07 <= mask.mean() <= 0.3 and ndimage.label(mask, EIGHT)[1] == 1
        assert change[mask].min() >= 1 and change.max() <= 10
        assert np.median(change[mask]) <= 8


def test_fine_cracks_are_thin_and_branch():
    for _, _, mask in _painted("fine_crack"):
        assert ndimage.label(mask, EIGHT)[1] == 1
        skeleton = skeletonize(mask)
        neighbours = ndimage.convolve(skeleton.astype(int), EIGHT.astype(int), mode="constant") - 1
        assert (skeleton & (neighbours == 1)).sum() >= 3  # a line has 2 ends, a branching crack more
        assert mask.sum() <= 2.5 * skeleton.sum()  # about one or two pixels wide
