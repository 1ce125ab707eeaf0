"""The Python API (README, "Python API") names a caller's mistake instead of failing deep in torch or
pyarrow, or returning a wrong score."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rayad.artifact import Predictor
from rayad.config import load_config
from rayad.errors import ConfigError, DataError, RayadError
from rayad.evaluate import evaluate
from rayad.settings import Cluster
from rayad.train import fit
from rayad.tune import SearchSettings, run_search


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.load(trained_run, device="cpu")


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 32, 32, 3), np.float32), "got a float32 array of shape (1, 32, 32, 3)"),  # scored 0.047 as good
    (np.zeros((1, 64, 64, 3), np.uint8), "got a uint8 array of shape (1, 64, 64, 3)"),  # scored at another size
    (np.zeros((32, 32, 3), np.uint8), "got a uint8 array of shape (32, 32, 3)"),  # a torch permute error
    ([np.zeros((32, 32, 3), np.uint8)], "got list"),
])
def test_predict_arrays_needs_the_models_input(predictor, images, message):
    with pytest.raises(DataError, match=r"expected a uint8 array of shape \(N, 32, 32, 3\)") as raised:
        predictor.predict_arrays(images)
    assert message in str(raised.value)


def test_predict_arrays_scores_a_view_with_negative_strides(predictor):
    """`images[..., ::-1]`, the usual BGR to RGB flip, gave torch's own ValueError about negative strides."""
    bgr = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    view = predictor.predict_arrays(bgr[..., ::-1]).scores
    np.testing.assert_array_equal(view, predictor.predict_arrays(bgr[..., ::-1].copy()).scores)


def test_predict_files_names_wrong_arguments_and_scores_the_rest(predictor, demo_root):
    image = demo_root / "brick" / "test" / "good" / "000.png"
    with pytest.raises(TypeError, match="a list of paths or encoded images, not one str"):
        predictor.predict_files(str(image))  # it scored each character as a file name
    with pytest.raises(TypeError, match="not one NoneType"):  # "'NoneType' object is not iterable" before
        predictor.predict_files(None)
    with pytest.raises(ValueError, match="names: 1 for 2 sources"):
        predictor.predict_files([image, image.read_bytes()], names=["a"])
    with pytest.raises(ConfigError, match="batch_size 0: must be an integer >= 1"):
        predictor.predict_files([image], batch_size=0)
    with pytest.raises(ConfigError, match="batch_size '8': must be an integer"):  # "'<' not supported" before
        predictor.predict_arrays(np.zeros((1, 32, 32, 3), np.uint8), "8")
    with pytest.raises(ConfigError, match="batch_size -1"):  # it returned no score and no error
        predictor.predict_files([image], batch_size=-1)
    preds, errors = predictor.predict_files([None, bytearray(image.read_bytes()), image])
    assert errors[0] == "a NoneType: not an image path, encoded bytes or a binary file" and errors[1:] == [None, None]
    assert preds.scores[0] == preds.scores[1]


def test_overrides_that_are_not_strings_are_named():
    with pytest.raises(TypeError, match=r"overrides: 'key=value' strings or a dict of dotted keys, not a tuple"):
        load_config(overrides=[("train.steps", 5)])  # "'tuple' object has no attribute 'partition'" before


def test_device_0_is_cuda_0_not_the_default(trained_run):
    """`device=0` is torch's cuda:0; it scored on the CPU, as if no device had been given."""
    with pytest.raises(ConfigError, match="device 'cuda:0': this process sees no CUDA GPU"):  # the suite hides GPUs
        Predictor.load(trained_run, device=0)


def test_evaluate_names_a_category_that_is_no_folder_name(predictor, demo_root):
    with pytest.raises(TypeError, match="category: the name of a folder under the data root, not None"):
        evaluate(predictor, demo_root, None)  # pathlib's "unsupported operand type(s) for /" before


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "device 'gpu': use cpu, cuda or cuda:N"),
    ({"device": "cuda"}, "device 'cuda': this process sees no CUDA GPU"),  # the suite hides GPUs
    ({"precision": "fp8"}, "precision 'fp8': use auto, fp32, bf16, fp16"),  # a KeyError at the first score
])
def test_predictor_load_checks_device_and_precision(trained_run, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Predictor.load(trained_run, **kwargs)


def test_config_fit_and_search_name_arguments_of_the_wrong_kind(demo_root, tmp_path):
    with pytest.raises(ConfigError, match="overrides \\(--set\\): must map dotted keys to values"):
        load_config(overrides="train.steps=7")
    assert load_config(overrides=("train.steps=7",)).train.steps == 7
    with pytest.raises(TypeError, match="cfg: a rayad.config.Config"):
        fit("my.yaml", demo_root, "brick", tmp_path / "run")
    blocker = tmp_path / "file"
    blocker.write_text("results already written")
    with pytest.raises(RayadError, match=f"{blocker}/run: {blocker} is a file, not a folder"):
        fit(load_config(), demo_root, "brick", blocker / "run")
    with pytest.raises(ConfigError, match="device 'gpu'"):
        fit(load_config(), demo_root, "brick", tmp_path / "run", device="gpu")
    with pytest.raises(TypeError, match="category: the name of a folder under the data root, not None"):
        fit(load_config(), demo_root, None, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # checked before anything is written
    with pytest.raises(RayadError, match=r"mlflow 'ftp://x' \(--mlflow\): MLflow cannot use it"):
        run_search(SearchSettings(str(demo_root), "brick", "quick", mlflow="ftp://x"), tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
    with pytest.raises(TypeError, match="settings: a rayad.tune.SearchSettings, not a dict"):
        run_search({"data_root": str(demo_root)}, tmp_path / "exp")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Cluster(workers=0), "cluster setting workers = 0 (--workers): must be >= 1"),
    (lambda: Cluster(cpus_per_worker=-1.0), "cpus_per_worker = -1.0 (--cpus-per-worker): must be > 0"),
    (lambda: Cluster(max_failures=-3), "max_failures = -3 (--max-failures): must be >= 0"),
    (lambda: Cluster(placement="pack"), "placement = 'pack': must be PACK or SPREAD"),
    (lambda: Cluster(use_gpu=True, gpus_per_worker=0.0), "gpus_per_worker = 0.0 (--gpus-per-worker): must be > 0"),
    (lambda: SearchSettings(data_root="d", category="c", space="s", trials=0),
     "search setting trials = 0 (--trials): must be >= 1"),
])
def test_settings_built_in_python_are_checked_as_the_command_line_checks_them(make, message):
    """The Python API's Cluster and SearchSettings refuse what the CLI refuses, when they are built."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_evaluate_scores_every_test_image_whatever_the_model_skipped_in_training(trained_run, demo_root, tmp_path):
    """data.on_bad_image=skip is for training data: a test split that dropped an image would be another test."""
    import shutil

    from rayad.config import DataConfig

    root = tmp_path / "data"
    shutil.copytree(demo_root / "brick", root / "brick")
    (root / "brick" / "test" / "good" / "000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="every test image is scored"):
        evaluate(trained_run, root, "brick", data=DataConfig(image_size=32, on_bad_image="skip"))
