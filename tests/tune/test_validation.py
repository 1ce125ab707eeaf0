"""The validation set of model selection: synthesised from held-out good images, never the test split."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy import ndimage

from rayad.artifact import Predictor
from rayad.data.dataset import load_split
from rayad.data.defects import DEFECTS, paint_defect
from rayad.data.manifest import build_manifest
from rayad.errors import DataError
from rayad.layout import VAL_METRICS
from rayad.metrics import compute_metrics
from rayad.validation import DEFECT_CANVAS, load_validation, synthesize_validation, validation_metrics


def test_colour_defects_change_only_masked_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for kind in DEFECTS:
        painted, mask = paint_defect(image, kind, rng)
        assert painted.shape == image.shape and mask.shape == (48, 48) and mask.any()
        assert np.array_equal(painted[~mask], image[~mask])
        assert not np.array_equal(painted[mask], image[mask])


@pytest.mark.parametrize("size", [DEFECT_CANVAS, 64])
def test_synthesized_set_pairs_good_images_with_defective_copies(size):
    good = np.random.default_rng(1).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    vset = synthesize_validation(good, seed=3, defects_per_image=2)
    assert len(vset.images) == 15 and vset.labels.tolist() == [0] * 5 + [1] * 10
    assert np.array_equal(vset.images[:5], good) and not vset.masks[:5].any() and vset.masks[5:].any(axis=(1, 2)).all()
    assert set(vset.defect_types[5:]) == set(DEFECTS)
    for i in range(5, 15):  # a defective copy differs from its good image only at the defect
        mask = vset.masks[i] if size == DEFECT_CANVAS else ndimage.binary_dilation(vset.masks[i], iterations=3)
        away = ~mask
        assert np.array_equal(vset.images[i][away], good[(i - 5) % 5][away])
    again = synthesize_validation(good, seed=3, defects_per_image=2)
    assert np.array_equal(again.images, vset.images)


def test_validation_uses_the_val_split_only(demo_root, tiny_config):
    vset = load_validation(tiny_config, demo_root, "brick")
    manifest = build_manifest(demo_root, "brick", tiny_config.data)
    val = load_split(manifest, "val", tiny_config.data.image_size)
    test = load_split(manifest, "test", tiny_config.data.image_size)
    assert np.array_equal(vset.images[vset.labels == 0], val.images)
    test_set = {img.tobytes() for img in test.images}
    assert not any(img.tobytes() in test_set for img in vset.images)


def test_labelled_validation_folder(demo_root, tiny_config, tmp_path):
    vset = load_validation(tiny_config, demo_root, "brick", val_root=demo_root)
    assert 0 < vset.labels.sum() < len(vset.labels) and vset.has_masks
    good_only = tmp_path / "brick"
    shutil.copytree(demo_root / "brick" / "train" / "good", good_only / "good")
    (good_only / "defect").mkdir()
    with pytest.raises(DataError, match="needs both good and defective"):
        load_validation(tiny_config.replace({"data.layout": "folder"}), demo_root, "brick", val_root=tmp_path)


def test_validation_metrics_score_as_evaluate_does(trained_run, demo_root):
    predictor = Predictor.load(trained_run)
    vset = load_validation(predictor.config, demo_root, "brick")
    got = validation_metrics(predictor.model.network, predictor.config, vset, "cpu")
    preds = predictor.predict_arrays(vset.images)
    expected = compute_metrics(preds.scores, vset.labels, None, preds.maps, vset.masks)
    assert set(got) == set(VAL_METRICS)
    for name in VAL_METRICS:
        assert got[name] == pytest.approx(expected[name.removeprefix("val_")], abs=1e-9)
    assert not predictor.model.network.training  # left in the mode it was in
