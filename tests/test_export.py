"""Export to TorchScript and ONNX: same scores and maps as the PyTorch model, calibration in the metadata."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayad.artifact import PREPROCESSING, Predictor
from rayad.cli import main
from rayad.data.dataset import load_split
from rayad.data.manifest import build_manifest
from rayad.errors import RayadError
from rayad.export import FORMATS, METADATA, TOLERANCE, export_model, run_exported
from rayad.layout import writing


@pytest.fixture(scope="module")
def test_images(trained_run, demo_root):
    predictor = Predictor.load(trained_run)
    manifest = build_manifest(demo_root, "brick", predictor.config.data)
    return load_split(manifest, "test", predictor.image_size).images


def _scoring(trained_run: Path, tmp_path: Path, **scoring) -> Path:
    """A copy of `trained_run` whose config scores as `scoring` says."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["config"]["scoring"].update(scoring)
    (run / "model.json").write_text(json.dumps(meta))
    return run


@pytest.mark.parametrize("image_score", ["mean", "topk"])  # topk's k was round() of a traced size: a traceback
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_export_matches_pytorch_on_test_images(fmt, image_score, trained_run, test_images, tmp_path):
    run = _scoring(trained_run, tmp_path, image_score=image_score)
    out = tmp_path / "exp"
    meta = export_model(run, fmt, out, check_images=test_images[:4])
    predictor = Predictor.load(run, device="cpu", precision="fp32")  # exports are fp32 graphs
    expected = predictor.predict_arrays(test_images)
    batch = test_images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    scores, maps = run_exported(out / FORMATS[fmt], fmt, batch)  # a batch size never traced with
    assert np.abs(scores - expected.scores).max() <= TOLERANCE[fmt]
    assert np.abs(maps - expected.maps).max() <= TOLERANCE[fmt]
    assert np.array_equal(scores >= meta["threshold"], expected.labels)
    written = json.loads((out / METADATA).read_text())
    model_json = json.loads((run / "model.json").read_text())
    assert written["threshold"] == model_json["threshold"] == predictor.threshold
    assert written["normalization"] == model_json["normalization"]
    assert written["preprocessing"] == model_json["preprocessing"] == PREPROCESSING
    assert written["parity"]["max_abs_difference"] <= TOLERANCE[fmt]


def test_onnx_file_carries_its_metadata(trained_run, tmp_path):
    import onnx

    export_model(trained_run, "onnx", tmp_path)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(props["rayad"])["threshold"] == float(props["threshold"])


def test_cli_export_and_errors(trained_run, tmp_path, capsys):
    run = tmp_path / "run"  # a model.json without preprocessing, which predict accepts: export did not (KeyError)
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "preprocessing"}))
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path)]) == 0
    assert "max difference to PyTorch" in capsys.readouterr().out and (tmp_path / "model.pt").is_file()
    assert main(["export", "--run", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "not a rayad model" in capsys.readouterr().err
    with pytest.raises(RayadError, match="choose from"):
        export_model(trained_run, "tflite", tmp_path)


def test_an_export_of_a_model_that_scores_in_bf16_says_its_labels_can_differ(trained_run, tmp_path, capsys):
    """The parity figure compares with the fp32 model, while predict and Serve score in bf16: the export said
    nothing of it (4 of 310 labels differed on a tiny model)."""
    run = _scoring(trained_run, tmp_path, precision="bf16")
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path / "exp")]) == 0
    assert "the model scores in bf16 (predict, evaluate, Serve) and this export in fp32" in capsys.readouterr().err
    assert json.loads((tmp_path / "exp" / METADATA).read_text())["model_precision"] == "bf16"


def test_an_export_folder_holds_one_format_written_by_one_command(trained_run, tmp_path, capsys):
    """An onnx export into a folder that held a torchscript one left model.pt beside a rayad_export.json that
    described the onnx file (and, from another run, another threshold)."""
    out = tmp_path / "exported"
    assert main(["export", "--run", str(trained_run), "--format", "torchscript", "--out", str(out)]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    assert main(["export", "--run", str(trained_run), "--format", "onnx", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"rayad export: error: {out}: holds model.pt, another format's export, which "
                                       f"{METADATA} describes; export onnx into another folder\n")
    with writing(out):  # as another rayad command does while it writes there
        assert main(["export", "--run", str(trained_run), "--format", "torchscript", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"rayad export: error: {out}: another rayad command is writing there; wait "
                                       "for it to end, or give another folder\n")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_an_export_into_a_run_or_over_a_model_file_it_did_not_write_is_refused(trained_run, tmp_path, capsys,
                                                                               monkeypatch):
    """An export into a run's own folder was written there, and the run could no longer be resumed; a user's own
    model.pt was replaced without a word."""
    run = _scoring(trained_run, tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.pt").write_text("my own checkpoint")
    before = {path.name for path in run.iterdir()}
    for out, message in [(run, f"{run} holds a model (model.json); export into a new folder"),
                         (theirs, f"{theirs}: holds model.pt, which no rayad export wrote (no {METADATA}); export")]:
        assert main(["export", "--run", str(run), "--format", "torchscript", "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"rayad export: error: {message}")
    assert {path.name for path in run.iterdir()} == before
    assert (theirs / "model.pt").read_text() == "my own checkpoint"

    def fails(*args):
        raise TypeError("type Tensor doesn't define __round__ method\nmore lines")
    monkeypatch.setattr("rayad.export._export_torchscript", fails)
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path / "exp")]) == 2
    assert capsys.readouterr().err == ("rayad export: error: the torchscript exporter failed on this model (TypeError: "
                                       "type Tensor doesn't define __round__ method); the other format may work\n")


def test_parity_benchmark_prints_both_formats_and_the_machine(trained_run, demo_root, tmp_path):
    (tmp_path / "brick").symlink_to(trained_run)  # the script reads the category from the folder's name
    script = Path(__file__).parents[1] / "benchmarks" / "export_parity.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "brick"), "--data", str(demo_root)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| brick |")]
    assert [r[1] for r in rows] == ["torchscript", "onnx"] and out.startswith("machine: ")
    for row, fmt in zip(rows, ("torchscript", "onnx"), strict=True):
        assert row[3].endswith(f"({TOLERANCE[fmt]:g})") and float(row[3].split()[0]) <= TOLERANCE[fmt]
        assert row[4].endswith("; 0")  # the exported labels are predict's in fp32
