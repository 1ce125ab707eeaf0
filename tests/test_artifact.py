import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY

from rayad.artifact import Predictor, require_cpp_compiler
from rayad.config import load_config
from rayad.data.defects import DEFECTS
from rayad.data.images import list_images
from rayad.errors import ConfigError, RayadError
from rayad.evaluate import evaluate
from rayad.predict import predict_paths
from rayad.scoring import quantile_threshold
from rayad.train import fit
from rayad.validation import load_validation


def test_artifact_holds_config_threshold_and_normalisation(trained_run):
    meta = json.loads((trained_run / "model.json").read_text())
    for key in ("rayad_version", "config", "threshold", "pixel_threshold", "normalization", "image_size", "train",
                "validation"):
        assert key in meta
    assert meta["image_size"] == 32 and meta["threshold"] > 0 and meta["pixel_threshold"] > 0


def test_the_model_and_its_checkpoints_follow_the_umask_as_other_files_do(trained_run):
    """safetensors creates 0600 files: another account (a server's) could not read a model trained by this one."""
    umask = os.umask(0o022)
    os.umask(umask)
    weights = [trained_run / "model.safetensors", *trained_run.glob("checkpoints/*/*.safetensors")]
    assert len(weights) >= 3
    for path in [*weights, trained_run / "model.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_masks_use_the_pixel_threshold_the_quantile_of_good_map_maxima(trained_run, demo_root):
    predictor = Predictor.load(trained_run)
    cfg = predictor.config
    vset = load_validation(cfg, demo_root, "brick")
    good_maps = predictor.predict_arrays(vset.images[vset.labels == 0]).maps
    expected = quantile_threshold(good_maps.max(axis=(1, 2)).astype(np.float64), cfg.scoring.threshold_quantile)
    assert predictor.pixel_threshold == pytest.approx(expected, rel=1e-6)
    out = predictor.predict_files(sorted((demo_root / "brick" / "test").rglob("*.png")))[0]
    np.testing.assert_array_equal(out.masks(), out.maps >= predictor.pixel_threshold)


def test_format_1_artifacts_still_load_with_masks_on_the_image_threshold(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    state = load_file(str(old / "model.safetensors"))
    del state["pixel_threshold"]
    save_file(state, str(old / "model.safetensors"))
    meta = json.loads((old / "model.json").read_text())
    del meta["pixel_threshold"]
    (old / "model.json").write_text(json.dumps({**meta, "format": "rayad-model/1"}))
    predictor = Predictor.load(old)
    assert predictor.pixel_threshold == predictor.threshold == pytest.approx(meta["threshold"])


def test_load_never_unpickles(trained_run, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("torch.load (pickle) used")

    monkeypatch.setattr(torch, "load", forbidden)
    predictor = Predictor.load(trained_run)
    assert predictor.threshold == pytest.approx(json.loads((trained_run / "model.json").read_text())["threshold"])


def test_evaluate_and_predict_give_identical_scores(trained_run, demo_root):
    predictor = Predictor.load(trained_run)
    metrics = evaluate(predictor, demo_root, "brick")
    preds, errors = predictor.predict_files(metrics["paths"], batch_size=3)
    assert errors == [None] * len(metrics["paths"])
    np.testing.assert_allclose(preds.scores, metrics["scores"], rtol=1e-6, atol=0)
    assert metrics["n_images"] == len(metrics["paths"]) == 4 + len(DEFECTS) * 2
    assert set(metrics["per_defect"]) == set(DEFECTS)


def test_predict_reports_bad_files_without_failing(trained_run, demo_root, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = list_images(demo_root / "brick" / "test" / "good")[:2]
    preds, errors = Predictor.load(trained_run).predict_files([good[0], bad, good[1]])
    assert len(preds.scores) == 2
    assert errors[0] is None and errors[2] is None and "bad.png" in errors[1]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a folder's link to nothing: it had no row
    shutil.copy(good[0], folder / "good.png")
    rows = predict_paths(trained_run, [folder], None, None, 8).to_pylist()
    assert [Path(r["path"]).name for r in rows] == ["gone.png", "good.png"]
    assert "gone.png" in rows[0]["error"] and rows[1]["error"] is None


def test_load_rejects_non_artifacts(tmp_path, trained_run):
    with pytest.raises(RayadError, match="not a rayad model"):
        Predictor.load(tmp_path)
    shutil.copytree(trained_run, tmp_path / "exp" / "best")
    with pytest.raises(RayadError, match=f"exp: an experiment, not a model; its best model is {tmp_path}/exp/best$"):
        Predictor.load(tmp_path / "exp")


def test_evaluate_names_a_bad_test_image_without_suggesting_a_flag_it_lacks(trained_run, demo_root, tmp_path,
                                                                             capsys, caplog):

    from rayad.cli import main

    data = tmp_path / "data"
    shutil.copytree(demo_root / "brick", data / "brick")
    bad = data / "brick" / "test" / "good" / "000.png"
    bad.write_bytes(b"not a png")
    args = ["evaluate", "--run", str(trained_run), "--data", str(data), "--category", "brick"]
    assert main(args) == 2
    err = capsys.readouterr().err  # one line; with -v the full list, with the hint, is logged
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with caplog.at_level("DEBUG", logger="rayad.cli"):
        assert main(["-v", *args]) == 2
    assert "fix or remove them" in caplog.text and "on_bad_image" not in caplog.text + err


def test_a_model_whose_output_overflows_has_no_metrics(trained_run, demo_root):
    predictor = Predictor.load(trained_run)
    with torch.no_grad():  # finite weights (loading refuses NaN ones) whose output overflows float32
        next(predictor.model.network.parameters()).mul_(1e38)
    with pytest.raises(RayadError, match=r"the model's output is NaN or infinite on \d+ of \d+ test images \(first: "):
        evaluate(predictor, demo_root, "brick")


def test_the_same_picture_scores_the_same_with_8_or_16_bits(trained_run, demo_root, tmp_path):
    from PIL import Image

    path = list_images(demo_root / "brick" / "test" / "good")[0]
    gray = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(gray).save(tmp_path / "8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    preds, errors = Predictor.load(trained_run).predict_files([tmp_path / "8.png", tmp_path / "16.png"])
    assert errors == [None, None] and preds.scores[0] == preds.scores[1]


def cpp_compiler_or_skip() -> None:
    """Skip without the C++ compiler inductor builds CPU kernels with, except in CI (.ci/run installs g++)."""
    try:
        require_cpp_compiler("cpu")
    except ConfigError as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))


def compiled_copy(trained_run, tmp_path):
    """A copy of `trained_run` whose config sets scoring.compile."""
    run = tmp_path / "compiled"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["config"]["scoring"]["compile"] = True
    (run / "model.json").write_text(json.dumps(meta))
    return run


@pytest.mark.slow
def test_compiled_scoring_gives_an_image_the_same_score_in_any_batch(trained_run, demo_root, tmp_path):
    """scoring.compile pads each batch to a power of two: an image scored alone (shape 1), among three (padded
    to 4) and among five in batches of four (shapes 4 and 1) gets one score, within rounding of the eager
    network's. Two graphs are compiled (shapes 1 and 4)."""
    cpp_compiler_or_skip()
    compiled = Predictor.load(compiled_copy(trained_run, tmp_path), device="cpu", precision="bf16")
    assert compiled.compiled is not None
    files = sorted((demo_root / "brick" / "test").rglob("*.png"))[:5]
    alone = [compiled.predict_files([f])[0].scores[0] for f in files[:2]]
    three = compiled.predict_files(files[:3], batch_size=4)[0].scores
    five = compiled.predict_files(files, batch_size=4)[0].scores
    assert alone == list(three[:2]) and list(three) == list(five[:3])
    eager = Predictor.load(trained_run, device="cpu", precision="bf16").predict_files(files)[0].scores
    np.testing.assert_allclose(five, eager, rtol=2e-2)


def test_compiled_scoring_without_a_cpp_compiler_fails_before_training(trained_run, demo_root, tmp_path,
                                                                         monkeypatch):
    """No C++ compiler for inductor on CPU: one clear ConfigError, raised before any step is trained."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-c++-compiler"))
    with pytest.raises(ConfigError, match="scoring.compile needs a C\\+\\+ compiler"):
        fit(load_config(overrides={**TINY, "scoring.compile": True}), demo_root, "brick", tmp_path / "run",
            progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="no-such-c"):
        Predictor.load(compiled_copy(trained_run, tmp_path), device="cpu")
