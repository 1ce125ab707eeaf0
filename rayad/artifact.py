"""Model artifacts (`model.safetensors` + `model.json`), their calibration, and the `Predictor` that loads
them without pickle. `Predictor.predict_arrays` is the one batch-scoring path (docs/design.md, "Scoring")."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rayad import __version__
from rayad.config import Config, DataConfig
from rayad.data.dataset import ImageSet, to_tensor
from rayad.data.images import load_image
from rayad.errors import ArtifactError, ConfigError, DataError
from rayad.inference import TTA_TOLERANCE, AnomalyModel, InferenceBatch, mirror_error_ratios
from rayad.layout import BEST, METADATA, WEIGHTS, atomic_write, follow_umask, write_json
from rayad.models import create_model
from rayad.precision import (
    Choice,
    checked_device,
    default_device,
    exact_cuda_math,
    native,
    probe_network,
    resolve,
)
from rayad.scoring import f1_threshold
from rayad.settings import PREDICT_BATCH

log = logging.getLogger(__name__)

FORMAT = "rayad-model/2"  # model.json's "format"; an artifact of another format is refused
FORMAT_1 = "rayad-model/1"  # read too: before pixel_threshold, masks used the image threshold (max scores)
MAX_WEIGHTS_HEADER = 16 * 2**20  # bytes of safetensors JSON header (the network's is a few kB)
CALIBRATION = ("threshold", "pixel_threshold", "score_mean", "score_std")  # AnomalyModel's, set by calibrate
# rayad.data.images.to_rgb_array in words, as model.json and exports say it: what a runtime must do before the graph
PREPROCESSING = {"color": "RGB: grayscale replicated, alpha dropped (premultiplied alpha undone first)",
                 "bit_depth": "each sample's 8 most significant bits: 16-bit v -> v >> 8 (32-bit integers clipped to "
                              "0..65535 first); 32-bit float refused",
                 "orientation": "as stored: an EXIF orientation tag is not applied",
                 "resize": "bilinear (Pillow's Image.resize) to image_size x image_size", "scale": "x / 255"}
COMPILED_GRAPHS = 64  # scoring.compile: graphs one process may compile before torch falls back to eager


def load_model(run_dir: str | Path) -> tuple[AnomalyModel, Config, dict[str, Any]]:
    """The calibrated model of an artifact folder, its config and metadata: the one loader, which checks
    the format, keys, shapes, dtypes and finiteness and names the file at fault (ArtifactError)."""
    run_dir = Path(run_dir)
    weights, meta_path = run_dir / WEIGHTS, run_dir / METADATA
    if not weights.is_file() or not meta_path.is_file():
        if (run_dir / BEST / METADATA).is_file():
            raise ArtifactError(f"{run_dir}: an experiment, not a model; its best model is {run_dir / BEST}")
        raise ArtifactError(f"{run_dir}: not a rayad model (needs {WEIGHTS} and {METADATA}; train one with "
                            "`rayad train`)")
    metadata = read_metadata(meta_path)
    try:
        config = Config.from_dict(metadata["config"], str(meta_path))
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    # every weight is in the artifact: a timm encoder's pretrained file, read again, might have moved
    model = build_anomaly_model(config.replace({"model.pretrained_file": None}, str(meta_path)))
    format_1 = metadata["format"] == FORMAT_1
    state = read_weights(weights, {k: v for k, v in model.state_dict().items()
                                   if not (format_1 and k == "pixel_threshold")})
    state.setdefault("pixel_threshold", state["threshold"].clone())  # format 1: masks used the image threshold
    model.load_state_dict(state, strict=True)
    for key in ("threshold", "pixel_threshold"):
        if not math.isclose(float(getattr(model, key)), metadata[key], rel_tol=1e-6):
            raise ArtifactError(f"{meta_path}: {key} {metadata[key]:.6g} disagrees with the one in {WEIGHTS} "
                                f"({float(getattr(model, key)):.6g})")
    return model, config, metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """`model.json`, checked: a JSON object of this format whose config and calibration are usable."""
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: corrupt metadata ({e})") from None
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    if metadata.get("format") not in (FORMAT, FORMAT_1):
        raise ArtifactError(f"{path}: format {metadata.get('format')!r} is not {FORMAT!r}, the one this rayad "
                            f"({__version__}) reads")
    if not isinstance(metadata.get("config"), dict):
        raise ArtifactError(f"{path}: no 'config' mapping")
    if metadata["format"] == FORMAT_1:  # before the pixel threshold, masks used the image threshold
        metadata = {**metadata, "pixel_threshold": metadata.get("threshold")}
    normalization = metadata.get("normalization") if isinstance(metadata.get("normalization"), dict) else {}
    thresholds = ((key, metadata.get(key)) for key in ("threshold", "pixel_threshold"))
    for key, value in (*thresholds, *normalization.items()):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ArtifactError(f"{path}: {key} = {value!r} is not a finite number (is the model calibrated?)")
    if set(normalization) != {"score_mean", "score_std"}:
        raise ArtifactError(f"{path}: 'normalization' needs score_mean and score_std")
    precision = metadata.get("precision") or {}
    if not isinstance(precision, dict) or not all(isinstance(v, dict) for v in precision.values()):
        raise ArtifactError(f"{path}: 'precision' must map train and scoring to what was chosen, got {precision!r}")
    data = metadata["config"].get("data") or {}
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: config section 'data' must be a mapping, got {data!r}")
    size = data.get("image_size", DataConfig.image_size)
    if metadata.get("image_size") != size:
        raise ArtifactError(f"{path}: image_size {metadata.get('image_size')!r} disagrees with the config's "
                            f"data.image_size {size!r}")
    return metadata


def model_version(run: Path) -> str:
    """The first 12 hex digits of the weights' SHA-256: changes whenever the model does (Serve's
    `GET /v1/models` reports it, and the dashboard finds a served model by it)."""
    return hashlib.sha256((Path(run) / WEIGHTS).read_bytes()).hexdigest()[:12]


def trained_category(metadata: dict[str, Any]) -> str | None:
    """The category a model was trained on (`model.json`'s train.category), where recorded."""
    train = metadata.get("train")
    category = train.get("category") if isinstance(train, dict) else None
    return category if isinstance(category, str) else None


def read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.safetensors`, checked against the state dict the config builds: same keys, shapes and dtypes,
    finite values."""
    try:
        with path.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
        if path.stat().st_size < 8 or header > min(path.stat().st_size - 8, MAX_WEIGHTS_HEADER):
            raise ArtifactError(f"{path} is unreadable (truncated, or not a safetensors file)")
        state = load_file(str(path))
    except ArtifactError:
        raise
    except PermissionError:
        raise ArtifactError(f"{path}: permission denied (this user may not read it)") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors for every kind of damage
        raise ArtifactError(f"{path} is unreadable (not a safetensors file: {type(e).__name__})") from None
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{path}: does not match its model.json config (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    for key, tensor in state.items():
        want = expected[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ArtifactError(f"{path}: {key} is {tuple(tensor.shape)} {tensor.dtype}, the config builds "
                                f"{tuple(want.shape)} {want.dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            what = "not calibrated" if key in CALIBRATION else "holds NaN or infinite values"
            raise ArtifactError(f"{path}: {key} {what}")
    return state


def build_anomaly_model(config: Config) -> AnomalyModel:
    return AnomalyModel(create_model(config.model), config.scoring)


def save_artifact(model: AnomalyModel, config: Config, out_dir: str | Path, extra: dict[str, Any] | None = None
                  ) -> Path:
    """Write weights and metadata; files are replaced atomically so a crash never leaves half an artifact."""
    if not model.is_calibrated:
        raise RuntimeError("refusing to save an uncalibrated model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "rayad_version": __version__,
        "config": config.to_dict(),
        "image_size": config.data.image_size,
        "preprocessing": PREPROCESSING,
        "threshold": float(model.threshold),
        "pixel_threshold": float(model.pixel_threshold),
        "normalization": {"score_mean": float(model.score_mean), "score_std": float(model.score_std)},
        **(extra or {}),
    }
    atomic_write(out_dir / WEIGHTS, lambda p: (save_file(state, str(p)), follow_umask(p)))
    write_json(out_dir / METADATA, metadata)
    return out_dir


def calibrate_and_save(network: torch.nn.Module, cfg: Config, val: ImageSet, out_dir: str | Path,
                       device: torch.device | str, train_info: dict[str, Any]) -> Path:
    """Calibrate trained weights on the validation split and write the artifact to `out_dir`. The threshold
    is the configured quantile of good scores, or F1-optimal when the split holds labelled anomalies."""
    model = build_anomaly_model(cfg)
    model.network.load_state_dict(network.state_dict())
    predictor = Predictor(model, cfg, {}, str(device))
    tta = predictor.resolve_tta(val.images[val.labels == 0])
    preds = predictor.predict_arrays(val.images)
    scores, labels = preds.scores, val.labels
    threshold = f1_threshold(scores, labels) if labels.any() else None
    good = labels == 0
    model.calibrate(scores[good], preds.maps[good].max(axis=(1, 2)), threshold)
    method = "f1" if labels.any() else f"quantile {cfg.scoring.threshold_quantile}"
    log.info("threshold %.6g (%s), pixel threshold %.6g (quantile %s of good map maxima) from %d validation "
             "images", float(model.threshold), method, float(model.pixel_threshold),
             cfg.scoring.threshold_quantile, len(scores))
    log.info("scoring in %s (%s)", predictor.precision.precision, predictor.precision.reason)
    validation = {"n_images": len(scores), "n_anomalous": int(labels.sum()), "threshold_method": method}
    precision = {"train": {"precision": train_info.get("precision"), "reason": train_info.get("precision_reason")},
                 "scoring": predictor.precision.as_dict()}
    return save_artifact(model, predictor.config, out_dir,
                         {"train": train_info, "validation": validation, "precision": precision, "tta": tta})


def compile_network(network: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """`network` compiled for scoring, one graph per batch shape. The compile cache is per function, shared by
    every model of the process (a Serve replica may host several): it may hold a graph per model, shape and
    precision, up to COMPILED_GRAPHS."""
    require_cpp_compiler(device)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS)
    return torch.compile(network, dynamic=False)


def require_cpp_compiler(device: str | torch.device) -> None:
    """scoring.compile builds C++ kernels on CPU: fail before any work when inductor's compiler is missing."""
    import torch._inductor.config as inductor_config

    cxx = inductor_config.cpp.cxx[-1]
    if torch.device(device).type == "cpu" and shutil.which(cxx) is None:
        raise ConfigError(f"scoring.compile needs a C++ compiler on CPU and {cxx!r} is not on PATH: install one "
                          "(e.g. g++), name it in CXX, or set scoring.compile=false")


@dataclass
class Predictions:
    """Scores of a set of images, on the CPU. Labels and normalised scores need a calibrated model."""

    scores: np.ndarray  # (N,) float64 image scores
    maps: np.ndarray  # (N, H, W) float32 anomaly maps at the model's input size
    threshold: float | None  # None for an uncalibrated model
    labels: np.ndarray | None  # (N,) bool: score >= threshold
    normalized: np.ndarray | None  # (N,) in standard deviations above the mean good validation score
    pixel_threshold: float | None = None  # None for an uncalibrated model
    reconstructions: np.ndarray | None = None  # (N, H, W, 3) uint8, when asked for

    def masks(self) -> np.ndarray:
        """(N, H, W) bool: the pixels whose anomaly map reaches the pixel threshold."""
        if self.pixel_threshold is None:
            raise RuntimeError("the model is not calibrated: masks need a threshold")
        return self.maps >= self.pixel_threshold


class Predictor:
    """Scores images with a model; training-time validation, evaluate, predict, Ray Data, Serve and the
    dashboard all score through `predict_arrays`."""

    def __init__(self, model: AnomalyModel, config: Config, metadata: dict[str, Any], device: str = "cpu",
                 precision: str | None = None):
        """`precision` (auto | fp32 | bf16 | fp16) overrides the model's `scoring.precision`."""
        if torch.device(device).type == "cuda":
            exact_cuda_math()  # the same scores wherever the model is scored (docs/design.md, "Precision")
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)
        self.config = config
        self.metadata = metadata
        self.device = device
        self.precision = self._precision(precision or config.scoring.precision)
        self.compiled = compile_network(self.model.network, device) if config.scoring.compile else None

    def _precision(self, requested: str) -> Choice:
        """`auto` reuses the precision the model was calibrated in, where this device runs it natively."""
        recorded = (self.metadata.get("precision") or {}).get("scoring") or {}
        if requested == "auto" and recorded.get("precision") and native(recorded["precision"], self.device):
            return Choice(recorded["precision"], "as calibrated (model.json)")
        probe = probe_network(self.model.network, self.image_size, training=False, device=self.device,
                              batch_size=PREDICT_BATCH)
        return resolve(requested, self.device, probe)

    TTA_IMAGES = 64  # good images that decide scoring.tta=auto

    @torch.no_grad()
    def resolve_tta(self, good_images: np.ndarray) -> dict[str, Any]:
        """Settle `scoring.tta=auto` on held-out good images: flips when each mirror view reconstructs them
        within TTA_TOLERANCE of the image itself (the material looks the same mirrored), else none."""
        scoring = self.config.scoring
        if scoring.tta != "auto":
            return {"choice": scoring.tta, "reason": "configured"}
        if not len(good_images):
            raise DataError("scoring.tta=auto needs good validation images to decide on; set scoring.tta")
        good = to_tensor(good_images[:self.TTA_IMAGES]).to(self.device, memory_format=torch.channels_last)
        ratios = mirror_error_ratios(self.model.network, good, self.precision.precision)
        choice = "flips" if max(ratios) <= TTA_TOLERANCE else "none"
        self.config = self.config.replace({"scoring.tta": choice})
        self.model.scoring = self.config.scoring
        reason = (f"mirror views reconstruct {len(good)} good images at {', '.join(f'{r:.2f}' for r in ratios)}x "
                  f"the error of the image (flips at most {TTA_TOLERANCE}x)")
        log.info("scoring.tta auto -> %s: %s", choice, reason)
        return {"choice": choice, "reason": reason, "mirror_error_ratios": ratios}

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None, precision: str | None = None) -> Predictor:
        model, config, metadata = load_model(run_dir)
        device = default_device() if device is None else checked_device(device)  # device=0 is cuda:0
        return cls(model, config, metadata, str(device), precision)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def threshold(self) -> float:
        return float(self.model.threshold)

    @property
    def pixel_threshold(self) -> float:
        return float(self.model.pixel_threshold)

    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray, batch_size: int = PREDICT_BATCH, reconstructions: bool = False
                       ) -> Predictions:
        """Score pre-processed uint8 images (N, H, W, 3) in batches; outputs reach the CPU once per batch."""
        self._check_arrays(images, batch_size)
        scores, maps, recons = [np.zeros(0, np.float32)], [np.zeros((0, *images.shape[1:3]), np.float32)], []
        for start in range(0, len(images), batch_size):
            batch = to_tensor(images[start:start + batch_size]).to(self.device, memory_format=torch.channels_last)
            out = self._score(batch)
            scores.append(out.pred_score.float().cpu().numpy())
            maps.append(out.anomaly_map.float().cpu().numpy())
            if reconstructions:
                recons.append(out.reconstruction.float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1)
                              .cpu().numpy())
        return self._calibrated(np.concatenate(scores).astype(np.float64), np.concatenate(maps),
                                np.concatenate(recons) if reconstructions else None)

    def _check_arrays(self, images: np.ndarray, batch_size: int) -> None:
        size = self.image_size
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
            shape = f"a {images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
                else type(images).__name__
            raise DataError(f"images: expected a uint8 array of shape (N, {size}, {size}, 3), the model's input "
                            f"(load_image decodes and resizes a file to it), got {shape}")
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size {batch_size!r}: must be an integer >= 1")

    def _score(self, batch: torch.Tensor) -> InferenceBatch:
        """The model's outputs for `batch`. A compiled network sees the batch padded with blank images to a
        power of two, so that it compiles once for each of a few shapes, whatever the batch sizes asked for."""
        if self.compiled is None:
            return self.model(batch, self.precision.precision)
        n = len(batch)
        pad = (1 << (n - 1).bit_length()) - n
        if pad:
            batch = torch.cat([batch, batch.new_zeros((pad, *batch.shape[1:]))]).contiguous(
                memory_format=torch.channels_last)
        out = self.model(batch, self.precision.precision, self.compiled)
        return InferenceBatch(*(t[:n] for t in out))

    def _calibrated(self, scores: np.ndarray, maps: np.ndarray, recons: np.ndarray | None) -> Predictions:
        if not self.model.is_calibrated:
            return Predictions(scores, maps, None, None, None, reconstructions=recons)
        threshold = self.threshold
        mean, std = float(self.model.score_mean), float(self.model.score_std)
        return Predictions(scores, maps, threshold, scores >= threshold, (scores - mean) / std, self.pixel_threshold,
                           recons)

    def predict_files(self, sources: list[str | Path | bytes], names: list[str] | None = None,
                      batch_size: int = PREDICT_BATCH) -> tuple[Predictions, list[str | None]]:
        """Decode and score image files (paths or encoded bytes, named by `names` in messages). Unreadable
        ones do not stop the run: predictions cover the readable ones, in order, and the second value holds,
        per source, None or the error message."""
        if isinstance(sources, str | bytes | Path) or not hasattr(sources, "__iter__"):
            raise TypeError(f"sources: a list of paths or encoded images, not one {type(sources).__name__}")
        sources = list(sources)
        if names is not None and len(names) != len(sources):
            raise ValueError(f"names: {len(names)} for {len(sources)} sources")
        images, errors = [], []
        for i, source in enumerate(sources):
            try:
                images.append(load_image(source, self.image_size, self.config.data.max_pixels))
                errors.append(None)
            except DataError as e:
                errors.append(str(e).replace("<bytes>", names[i]) if names else str(e))
        size = self.image_size
        stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        return self.predict_arrays(stacked, batch_size), errors
