from __future__ import annotations

import csv
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayad.config import DataConfig
from rayad.data.dataset import load_split
from rayad.data.layouts import detect_layout
from rayad.data.manifest import build_manifest
from rayad.errors import DataError

NO_VAL = DataConfig(val_fraction=0.0)


def png(path: Path, mode: str = "RGB", size: int = 16) -> str:
    """Write a tiny image with content derived from its path; return the path as str."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return str(path)


def mask_png(path: Path, size: int = 16) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[4:8, 4:8] = 255
    Image.fromarray(m).save(path)
    return str(path)


def rows_of(manifest) -> set[tuple]:
    return {(r["path"], r["split"], r["label"], r["defect_type"], r["mask_path"]) for r in manifest.to_pylist()}


def make_mvtec(root: Path, category: str = "bottle", mode: str = "RGB", n_train: int = 4,
               defects: dict[str, int] | None = None, masks: bool = True) -> set[tuple]:
    """MVTec AD miniature; returns the expected manifest rows (no validation carving)."""
    base = root / category
    rows = {(png(base / "train" / "good" / f"{i:03d}.png", mode), "train", 0, "good", None) for i in range(n_train)}
    rows |= {(png(base / "test" / "good" / f"{i:03d}.png", mode), "test", 0, "good", None) for i in range(2)}
    for defect, n in (defects or {"crack": 2, "scratch": 1}).items():
        for i in range(n):
            mask = mask_png(base / "ground_truth" / defect / f"{i:03d}_mask.png") if masks else None
            rows.add((png(base / "test" / defect / f"{i:03d}.png", mode), "test", 1, defect, mask))
    return rows


def make_mvtec2(root: Path, category: str = "can") -> set[tuple]:
    base = root / category
    rows = {(png(base / "train" / "good" / f"{i:03d}.png"), "train", 0, "good", None) for i in range(5)}
    rows |= {(png(base / "validation" / "good" / f"{i:03d}.png"), "val", 0, "good", None) for i in range(2)}
    rows |= {(png(base / "test_public" / "good" / f"{i:03d}.png"), "test", 0, "good", None) for i in range(2)}
    for i in range(3):
        mask = mask_png(base / "test_public" / "ground_truth" / "bad" / f"{i:03d}_mask.png")
        rows.add((png(base / "test_public" / "bad" / f"{i:03d}.png"), "test", 1, "bad", mask))
    return rows


VISA_COLUMNS = ["object", "split", "label", "image", "mask"]


def make_visa(root: Path, columns: list[str] = VISA_COLUMNS) -> set[tuple]:
    """VisA miniature with objects candle and pcb1; returns the expected rows for candle."""
    records, expected = [], set()
    for obj in ("candle", "pcb1"):
        for i in range(6):
            anomalous = i >= 4
            kind = "Anomaly" if anomalous else "Normal"
            image = f"{obj}/Data/Images/{kind}/{i:03d}.JPG"
            mask = f"{obj}/Data/Masks/Anomaly/{i:03d}.png" if anomalous else ""
            png(root / image)
            if mask:
                mask_png(root / mask)
            split = "test" if anomalous or i == 3 else "train"
            records.append({"object": obj, "split": split, "label": "anomaly" if anomalous else "normal",
                            "image": image, "mask": mask})
            if obj == "candle":
                expected.add((str(root / image), split, int(anomalous), "anomaly" if anomalous else "good",
                              str(root / mask) if mask else None))
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return expected


def make_folder(root: Path, category: str = "widget", n_good: int = 10, n_defect: int = 3) -> Path:
    base = root / category
    for i in range(n_good):
        png(base / "good" / f"g{i:02d}.png")
    for i in range(n_defect):
        png(base / "defect" / f"d{i:02d}.png")
        # both mask naming conventions: <stem>_mask.png and <stem>.png
        mask_png(base / "mask" / (f"d{i:02d}_mask.png" if i % 2 else f"d{i:02d}.png"))
    return base


def test_mvtec_rows(tmp_path):
    expected = make_mvtec(tmp_path)
    assert rows_of(build_manifest(tmp_path, "bottle", NO_VAL)) == expected


def test_mvtec_grayscale_category(tmp_path):
    expected = make_mvtec(tmp_path, "grid", mode="L")
    manifest = build_manifest(tmp_path, "grid", NO_VAL)
    assert rows_of(manifest) == expected
    assert Image.open(manifest["path"][0].as_py()).mode == "L"
    test = load_split(manifest, "test", 16)
    assert test.images.shape == (5, 16, 16, 3) and test.images.dtype == np.uint8
    assert (test.images[..., 0] == test.images[..., 2]).all()
    assert test.masks.shape == (5, 16, 16)


def test_mvtec_schema_types(tmp_path):
    make_mvtec(tmp_path)
    manifest = build_manifest(tmp_path, "bottle", NO_VAL)
    assert manifest.column_names == ["path", "split", "label", "defect_type", "mask_path"]
    assert str(manifest.schema.field("label").type) == "int8"


def test_mvtec2_rows_keep_validation_folder(tmp_path):
    expected = make_mvtec2(tmp_path)
    manifest = build_manifest(tmp_path, "can", DataConfig(val_fraction=0.5))
    assert rows_of(manifest) == expected
    assert manifest["split"].to_pylist().count("train") == 5


def test_visa_rows(tmp_path):
    expected = make_visa(tmp_path)
    assert rows_of(build_manifest(tmp_path, "candle", NO_VAL)) == expected


def test_folder_rows(tmp_path):
    base = make_folder(tmp_path)
    cfg = DataConfig(layout="folder", mask_dir="mask", test_fraction=0.2, val_fraction=0.0)
    rows = build_manifest(tmp_path, "widget", cfg).to_pylist()
    good = [r for r in rows if r["label"] == 0]
    bad = [r for r in rows if r["label"] == 1]
    assert {r["path"] for r in good} == {str(p) for p in (base / "good").iterdir()}
    assert [r["split"] for r in good].count("test") == 2
    assert all(r["mask_path"] is None and r["defect_type"] == "good" for r in good)
    assert len(bad) == 3 and all(r["split"] == "test" and r["defect_type"] == "defect" for r in bad)
    for r in bad:
        stem = Path(r["path"]).stem
        assert r["mask_path"] in (str(base / "mask" / f"{stem}_mask.png"), str(base / "mask" / f"{stem}.png"))
        assert Path(r["mask_path"]).is_file()


def test_folder_without_mask_dir_has_no_masks(tmp_path):
    make_folder(tmp_path)
    rows = build_manifest(tmp_path, "widget", DataConfig(layout="folder")).to_pylist()
    assert all(r["mask_path"] is None for r in rows)
    assert sum(r["label"] for r in rows) == 3


def test_folder_test_share_is_seeded(tmp_path):
    make_folder(tmp_path)

    def test_good(seed):
        cfg = DataConfig(layout="folder", test_fraction=0.3, split_seed=seed, val_fraction=0.0)
        return {r["path"] for r in build_manifest(tmp_path, "widget", cfg).to_pylist()
                if r["split"] == "test" and r["label"] == 0}

    assert len(test_good(0)) == 3
    assert test_good(0) == test_good(0)
    assert any(test_good(s) != test_good(0) for s in (1, 2, 3))


@pytest.mark.parametrize(("maker", "category", "layout"), [
    (make_mvtec, "bottle", "mvtec"),
    (make_mvtec2, "can", "mvtec2"),
    (make_visa, "candle", "visa"),
])
def test_auto_detects_layout(tmp_path, maker, category, layout):
    maker(tmp_path)
    assert detect_layout(tmp_path, category) == layout
    auto = build_manifest(tmp_path, category, NO_VAL)
    explicit = build_manifest(tmp_path, category, DataConfig(layout=layout, val_fraction=0.0))
    assert rows_of(auto) == rows_of(explicit)


def test_auto_refuses_plain_folders(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError, match="layout folder"):
        build_manifest(tmp_path, "widget")


def test_validation_is_carved_from_train(tmp_path):
    expected = make_mvtec(tmp_path, n_train=20)
    train = {r[0] for r in expected if r[1] == "train"}

    def splits(seed):
        rows = build_manifest(tmp_path, "bottle", DataConfig(val_fraction=0.25, split_seed=seed)).to_pylist()
        return ({r["path"] for r in rows if r["split"] == "val"}, {r["path"] for r in rows if r["split"] == "train"},
                {r["path"] for r in rows if r["split"] == "test"})

    val, kept, test = splits(7)
    assert len(val) == 5 and not val & kept
    assert val | kept == train
    assert test == {r[0] for r in expected if r[1] == "test"}
    assert splits(7) == (val, kept, test)
    assert splits(8)[0] != val


@pytest.mark.parametrize("n_train, fraction, n_val", [(3, 0.9, 2), (3, 0.1, 2), (2, 0.5, 0), (10, 0.2, 2),
                                                      (10, 0.5, 5)])
def test_carving_takes_two_images_or_none_and_leaves_one_to_train_on(tmp_path, n_train, fraction, n_val):
    """The calibration's standard deviation needs two images (one gave normalised scores of ~1e9); a fraction
    of 0.9 of 3 images took all three, and training failed with 'no usable training images'."""
    make_mvtec(tmp_path, n_train=n_train)
    splits = build_manifest(tmp_path, "bottle", DataConfig(val_fraction=fraction))["split"].to_pylist()
    assert splits.count("val") == n_val and splits.count("train") == n_train - n_val


def test_single_train_image_gets_no_validation(tmp_path):
    make_mvtec(tmp_path, n_train=1)
    splits = build_manifest(tmp_path, "bottle", DataConfig(val_fraction=0.5))["split"].to_pylist()
    assert splits.count("train") == 1 and "val" not in splits


def test_error_missing_root(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="data root not found") as err:
        build_manifest(root, "bottle")
    assert str(root) in str(err.value)


def test_error_unknown_category_lists_existing(tmp_path):
    make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "grid")
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(DataError, match="category 'cable' not found") as err:
        build_manifest(tmp_path, "cable", DataConfig(layout="mvtec"))
    assert "bottle, grid" in str(err.value)
    assert ".hidden" not in str(err.value)


def test_error_missing_subfolder(tmp_path):
    png(tmp_path / "bottle" / "train" / "good" / "000.png")
    with pytest.raises(DataError, match="folder not found") as err:
        build_manifest(tmp_path, "bottle")
    assert str(tmp_path / "bottle" / "test") in str(err.value)


def test_error_empty_training_set(tmp_path):
    make_mvtec(tmp_path, n_train=0)
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match="no training images") as err:
        build_manifest(tmp_path, "bottle")
    assert str(tmp_path / "bottle") in str(err.value)


def test_error_some_masks_missing(tmp_path):
    make_mvtec(tmp_path, defects={"crack": 3})
    missing = tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DataError, match="1 anomalous image") as err:
        build_manifest(tmp_path, "bottle")
    message = str(err.value)
    assert str(tmp_path / "bottle" / "test" / "crack" / "001.png") in message
    assert "000.png" not in message and "002.png" not in message


def test_no_masks_at_all_is_allowed(tmp_path):
    make_mvtec(tmp_path, masks=False)
    rows = build_manifest(tmp_path, "bottle", NO_VAL).to_pylist()
    assert sum(r["label"] for r in rows) == 3
    assert all(r["mask_path"] is None for r in rows)


def test_error_visa_missing_column(tmp_path):
    make_visa(tmp_path, columns=["object", "split", "label", "image"])
    with pytest.raises(DataError, match="missing column") as err:
        build_manifest(tmp_path, "candle")
    assert "'mask'" in str(err.value)


def test_error_visa_unknown_object(tmp_path):
    make_visa(tmp_path)
    with pytest.raises(DataError, match="category 'fryum'") as err:
        build_manifest(tmp_path, "fryum")
    assert "candle, pcb1" in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace(",test,anomaly,", ",Test,anomaly,", 1), "split 'Test' and label 'anomaly' must be"),
    (lambda text: text.replace(",anomaly,", ",bad,", 1), "label 'bad' must be one of"),
    (lambda text: text + "candle,train\n", "fewer fields than the header"),
    (lambda text: text.encode("latin-1").replace(b"candle", "cändle".encode("latin-1"), 1), "not UTF-8 text"),
    (lambda text: text + 'candle,test,"' + "x" * 200_000 + "\n", "not a readable CSV file"),
    # these were read: an anomaly trained on as good; an image trained on twice, or scored and trained on
    (lambda text: text.replace("test,anomaly,candle/Data/Images/Anomaly/004", "train,anomaly,candle/Data/Images/"
                               "Anomaly/004"), r"line 6: an anomaly in split train; rayad trains on normal images"),
    (lambda text: text + "candle,test,normal, ,\n", "line 14: no image path"),  # it named the root, "not an image"
    (lambda text: text + "candle,test,normal,candle/Data/Images/Normal/000.JPG,\n",
     r"line 14: image candle/Data/Images/Normal/000.JPG is listed on line 2 too"),
    # the line, not the record: a blank line before it said line 6
    (lambda text: text.replace("\n", "\n\n", 2).replace(",test,anomaly,", ",Test,anomaly,", 1), "line 8: split 'Test'"),
])
def test_visa_rows_a_reader_would_misread_are_refused(tmp_path, edit, message):
    make_visa(tmp_path)
    split_csv = tmp_path / "split_csv" / "1cls.csv"
    edited = edit(split_csv.read_text())
    split_csv.write_bytes(edited if isinstance(edited, bytes) else edited.encode())
    with pytest.raises(DataError, match=message):  # they used to become good images, or training images
        build_manifest(tmp_path, "candle")


def test_visa_csv_saved_by_excel_with_a_byte_order_mark(tmp_path):
    expected = make_visa(tmp_path)
    split_csv = tmp_path / "split_csv" / "1cls.csv"
    split_csv.write_bytes(b"\xef\xbb\xbf" + split_csv.read_bytes())
    assert rows_of(build_manifest(tmp_path, "candle", NO_VAL)) == expected


def test_mvtec2_without_good_test_images_and_masks_with_an_upper_case_extension(tmp_path):
    make_mvtec2(tmp_path)
    test = tmp_path / "can" / "test_public"
    shutil.rmtree(test / "good")
    for mask in (test / "ground_truth" / "bad").iterdir():
        mask.rename(mask.with_suffix(".PNG"))
    rows = build_manifest(tmp_path, "can", DataConfig(val_fraction=0.5)).to_pylist()
    bad = [r for r in rows if r["split"] == "test"]
    assert bad and all(r["label"] == 1 and r["mask_path"].endswith("_mask.PNG") for r in bad)


def test_a_file_name_that_is_not_utf8_is_named_in_one_line(tmp_path):
    """Manifests store paths as text: such a name crashed training with a UnicodeEncodeError."""
    from rayad.data.images import list_images

    Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png")).write_bytes(b"")
    with pytest.raises(DataError, match=r"caf\\xe9.png: the file name is not valid UTF-8; rename it"):
        list_images(tmp_path)


def test_hidden_files_are_no_images_and_a_link_to_nothing_is_kept_to_be_named(tmp_path):
    """macOS's `._001.png` beside each image failed training as a bad image; a dangling link was dropped unsaid."""
    from rayad.data.images import list_images

    (tmp_path / "001.png").write_bytes(b"")
    (tmp_path / "._001.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
    (tmp_path / "002.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "003.png").mkdir()
    assert list_images(tmp_path) == [tmp_path / "001.png", tmp_path / "002.png"]


def test_hidden_folders_under_test_are_no_defect_types(tmp_path):
    """`test/.thumbs` (good copies) was read as a defect type: its images scored as defects."""
    expected = make_mvtec(tmp_path, masks=False)
    png(tmp_path / "bottle" / "test" / ".thumbs" / "000.png")
    assert rows_of(build_manifest(tmp_path, "bottle", NO_VAL)) == expected


@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_masks_named_after_no_image_are_refused(tmp_path, layout):
    """Pixel metrics were dropped without a word: masks named 000_gt.png match no image's name."""
    if layout == "mvtec":
        make_mvtec(tmp_path, defects={"crack": 2}, masks=False)
        masks, cfg = tmp_path / "bottle" / "ground_truth" / "crack", NO_VAL
    else:
        base = make_folder(tmp_path)
        masks, cfg = base / "mask", DataConfig(layout="folder", mask_dir="mask", val_fraction=0.0)
        shutil.rmtree(masks)
    for stem in ("000", "001") if layout == "mvtec" else ("d00", "d01", "d02"):
        mask_png(masks / f"{stem}_gt.png")
    with pytest.raises(DataError, match=f"{masks}: none of its masks is named after an image of .*_mask.png or"):
        build_manifest(tmp_path, "bottle" if layout == "mvtec" else "widget", cfg)


@pytest.mark.parametrize("folders, message", [
    ({"abnormal_dir": "good"}, "data.normal_dir and data.abnormal_dir are the same folder"),
    ({"mask_dir": "good"}, "data.normal_dir and data.mask_dir are the same folder"),
    ({"mask_dir": "defect"}, "data.abnormal_dir and data.mask_dir are the same folder"),  # masks became defects
])
def test_folder_layout_refuses_one_folder_in_two_roles(tmp_path, folders, message):
    make_folder(tmp_path)
    with pytest.raises(DataError, match=message):
        build_manifest(tmp_path, "widget", DataConfig(layout="folder", **folders))


def test_a_mask_without_a_grayscale_is_one_error(tmp_path):
    from rayad.data.images import load_mask

    Image.new("LAB", (8, 8)).save(tmp_path / "m.tif")
    with pytest.raises(DataError, match="m.tif: a LAB image, which has no grayscale for a mask"):
        load_mask(tmp_path / "m.tif", 8)


def test_every_layout_the_config_names_has_a_reader():
    from rayad.config import LAYOUTS
    from rayad.data.layouts import READERS

    assert {*READERS, "auto"} == set(LAYOUTS)
