"""Broken model artifacts: every consumer gets one error naming the file, nothing is changed, and Serve
keeps serving the good models beside a broken one."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayad.artifact import Predictor
from rayad.cli import main
from rayad.errors import ArtifactError, RayadError
from rayad.serve import discover_models


def _weights(transform):
    def damage(run: Path) -> None:
        state = load_file(str(run / "model.safetensors"))
        save_file(transform(state), str(run / "model.safetensors"))
    return damage


def _meta(transform):
    def damage(run: Path) -> None:
        path = run / "model.json"
        path.write_text(json.dumps(transform(json.loads(path.read_text()))))
    return damage


def _bytes(name: str, transform):
    def damage(run: Path) -> None:
        path = run / name
        path.write_bytes(transform(path.read_bytes()))
    return damage


def _first_conv(state: dict) -> str:
    return next(k for k, v in state.items() if v.ndim == 4)


DAMAGE = {
    "truncated weights": (_bytes("model.safetensors", lambda b: b[: len(b) // 2]), "model.safetensors is unreadable"),
    "empty weights": (_bytes("model.safetensors", lambda b: b""), "model.safetensors is unreadable"),
    "random weights": (_bytes("model.safetensors", lambda b: bytes(range(256)) * 8), "model.safetensors is unreadable"),
    "huge header": (_bytes("model.safetensors", lambda b: struct.pack("<Q", 2**40) + b[8:]),
                    "model.safetensors is unreadable"),
    "wrong shape": (_weights(lambda s: {**s, (k := _first_conv(s)): torch.zeros(1, *s[k].shape[1:])}),
                    "the config builds"),
    "missing key": (_weights(lambda s: {k: v for k, v in list(s.items())[1:]}), "missing ["),
    "extra key": (_weights(lambda s: {**s, "extra.weight": torch.zeros(2)}), "unexpected ['extra.weight']"),
    "NaN weights": (_weights(lambda s: {**s, (k := _first_conv(s)): torch.full_like(s[k], float("nan"))}),
                    "holds NaN or infinite values"),
    "uncalibrated": (_weights(lambda s: {**s, "threshold": torch.tensor(float("nan"))}), "threshold not calibrated"),
    "metadata is a list": (_bytes("model.json", lambda b: b"[1, 2]"), "expected a JSON object, got list"),
    "metadata not UTF-8": (_bytes("model.json", lambda b: b"\xff\xfe{}"), "model.json: not UTF-8 text"),
    "metadata not JSON": (_bytes("model.json", lambda b: b[:20]), "corrupt metadata"),
    "no config": (_meta(lambda m: {k: v for k, v in m.items() if k != "config"}), "no 'config' mapping"),
    "unknown format": (_meta(lambda m: {**m, "format": "rayad-model/9"}), "format 'rayad-model/9' is not"),
    "no threshold": (_meta(lambda m: {k: v for k, v in m.items() if k != "threshold"}),
                     "threshold = None is not a finite number"),
    "image sizes disagree": (_meta(lambda m: {**m, "image_size": 64}), "image_size 64 disagrees"),
    "thresholds disagree": (_meta(lambda m: {**m, "threshold": m["threshold"] * 2}), "disagrees with the one in"),
    "no pixel threshold": (_meta(lambda m: {k: v for k, v in m.items() if k != "pixel_threshold"}),
                           "pixel_threshold = None is not a finite number"),
    "pixel thresholds disagree": (_meta(lambda m: {**m, "pixel_threshold": m["pixel_threshold"] * 2}),
                                  "pixel_threshold"),
    "bad config value": (_meta(lambda m: {**m, "config": {**m["config"], "model": {"skip": "nope"}}}), "model.skip"),
    "config section a list": (_meta(lambda m: {**m, "config": {**m["config"], "data": [1, 2]}}),
                              "config section 'data' must be a mapping, got [1, 2]"),
    "precision not a mapping": (_meta(lambda m: {**m, "precision": {"scoring": "bf16"}}),
                                "'precision' must map train and scoring"),
}


def _checksums(run: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def broken(trained_run, tmp_path, request):
    damage, needle = DAMAGE[request.param]
    run = tmp_path / "broken"
    shutil.copytree(trained_run, run)
    damage(run)
    return run, needle


@pytest.mark.parametrize("broken", list(DAMAGE), indirect=True)
def test_loader_names_the_file_and_the_problem(broken):
    run, needle = broken
    with pytest.raises(ArtifactError, match=re.escape(needle)) as info:
        Predictor.load(run)
    assert str(run) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("broken", ["truncated weights", "unknown format", "image sizes disagree"], indirect=True)
def test_cli_exits_2_with_one_line_and_changes_nothing(broken, demo_root, tmp_path, capsys):
    run, needle = broken
    before = _checksums(run)
    for args in (["evaluate", "--run", str(run), "--data", str(demo_root), "--category", "brick"],
                 ["predict", "--run", str(run), str(demo_root / "brick" / "test" / "good")],
                 ["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path / "export")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert _checksums(run) == before


@pytest.mark.parametrize("broken", ["NaN weights", "no threshold"], indirect=True)
def test_serve_leaves_out_a_broken_model_and_keeps_the_others(broken, trained_run, tmp_path, caplog):
    run, needle = broken
    folder = tmp_path / "models"
    shutil.copytree(trained_run, folder / "good")
    shutil.move(run, folder / "bad")
    assert discover_models(folder) == {"good": str((folder / "good").absolute())}
    assert "not serving model 'bad'" in caplog.text and needle in caplog.text
    shutil.rmtree(folder / "good")
    with pytest.raises(RayadError, match="no usable model"):
        discover_models(folder)
