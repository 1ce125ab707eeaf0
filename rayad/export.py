"""Export a model artifact to TorchScript or ONNX, with threshold and normalisation in its metadata.

The exported graph takes float images (B, 3, H, W) in [0, 1] (RGB, resized as `preprocessing` says) and
returns the raw image scores (B,) and anomaly maps (B, H, W); label = score >= threshold, mask = map >=
pixel_threshold. Every export is checked against the PyTorch model before it is written out, on the images
given (`check_images`) or else seeded noise.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rayad.artifact import PREPROCESSING, Predictor
from rayad.data.dataset import to_tensor
from rayad.errors import RayadError
from rayad.inference import AnomalyModel
from rayad.layout import (
    CHECKPOINTS,
    EXPERIMENT,
    EXPORTED,
    TRIALS,
    WORKERS_RUN,
    refuse_other_kinds,
    writing,
)
from rayad.layout import METADATA as MODEL

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}
METADATA = EXPORTED
TOLERANCE = {"torchscript": 1e-6, "onnx": 1e-5}  # max |exported - PyTorch| on scores and maps


class ScoringGraph(nn.Module):
    """The part of scoring that is a pure function of the pixels: network, residual map, image score."""

    def __init__(self, model: AnomalyModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.pred_score, out.anomaly_map


def export_model(run_dir: str | Path, fmt: str, out_dir: str | Path, check_images: np.ndarray | None = None
                 ) -> dict[str, Any]:
    """Write `out_dir/model.pt|model.onnx` and `out_dir/rayad_export.json`; returns the metadata."""
    if fmt not in FORMATS:
        raise RayadError(f"format {fmt!r} (--format): choose from {sorted(FORMATS)}")
    predictor = Predictor.load(run_dir, device="cpu")
    graph = ScoringGraph(predictor.model).eval()
    size = predictor.image_size
    inputs = _check_inputs(check_images, size)
    out_dir = Path(out_dir)
    with writing(out_dir):
        _check_export_folder(out_dir, fmt)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            path = Path(tmp) / FORMATS[fmt]
            try:
                (_export_torchscript if fmt == "torchscript" else _export_onnx)(graph, inputs, path)
            except Exception as e:  # the exporter's own limits, in torch's words; nothing is written
                first = str(e).strip().splitlines()[:1]
                raise RayadError(f"the {fmt} exporter failed on this model ({type(e).__name__}: "
                                 f"{first[0] if first else 'no message'}); the other format may work") from e
            diff = _max_difference(graph, inputs, path, fmt)
            if diff > TOLERANCE[fmt]:
                raise RayadError(f"the {fmt} export differs from the PyTorch model by {diff:.3g} "
                                 f"(tolerance {TOLERANCE[fmt]:g}); not written")
            metadata = _metadata(predictor, fmt, diff, len(inputs))
            if fmt == "onnx":
                _embed_onnx_metadata(path, metadata)
            (Path(tmp) / METADATA).write_text(json.dumps(metadata, indent=2))
            # both written in full first (a full disk fails there), then renamed: the description before the model
            os.replace(Path(tmp) / METADATA, out_dir / METADATA)
            os.replace(path, out_dir / FORMATS[fmt])
    return metadata


def _check_export_folder(out_dir: Path, fmt: str) -> None:
    """An export folder holds one model file and the METADATA that describes it: no run's or search's files (a
    run's folder could no longer be resumed), no folder where they go, no other format's file, which the new
    METADATA would describe wrongly, and no model file that no export wrote."""
    refuse_other_kinds(out_dir, (MODEL, CHECKPOINTS, WORKERS_RUN, EXPERIMENT, TRIALS), "export into a new folder")
    blocking = [p for p in (out_dir / FORMATS[fmt], out_dir / METADATA) if p.is_dir()]
    if blocking:
        raise RayadError(f"{out_dir}: {blocking[0]} is a folder; the export writes a file there")
    other = next((name for other_fmt, name in FORMATS.items() if other_fmt != fmt and (out_dir / name).exists()), None)
    if other is not None:
        raise RayadError(f"{out_dir}: holds {other}, another format's export, which {METADATA} describes; export "
                         f"{fmt} into another folder")
    if (out_dir / FORMATS[fmt]).exists() and not (out_dir / METADATA).exists():
        raise RayadError(f"{out_dir}: holds {FORMATS[fmt]}, which no rayad export wrote (no {METADATA}); export "
                         "into another folder")


def _check_inputs(images: np.ndarray | None, size: int) -> torch.Tensor:
    """Real images when given (uint8 N, H, W, 3), else seeded noise, as a float batch in [0, 1]."""
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    return to_tensor(images).contiguous()


def _export_torchscript(graph: nn.Module, inputs: torch.Tensor, path: Path) -> None:
    """Traced at the model's fixed input size (shape checks become constants: hence the quieted warnings;
    TorchScript is deprecated in torch 2.14 but still the format many C++ and mobile runtimes load)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (torch.jit.TracerWarning, FutureWarning))
        torch.jit.save(torch.jit.trace(graph, inputs[:1], check_trace=False), str(path))


def _export_onnx(graph: nn.Module, inputs: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(graph, (inputs[:2],), str(path), input_names=["images"],
                          output_names=["scores", "anomaly_maps"], dynamic_shapes={"images": {0: batch}},
                          dynamo=True, external_data=False, verbose=False)


def _max_difference(graph: nn.Module, inputs: torch.Tensor, path: Path, fmt: str) -> float:
    with torch.no_grad():
        expected = [t.numpy() for t in graph(inputs)]
    got = run_exported(path, fmt, inputs.numpy())
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))


def run_exported(path: str | Path, fmt: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of an exported model for float images (N, 3, H, W) in [0, 1]."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path))
        with torch.no_grad():
            scores, maps = module(torch.from_numpy(images))
        return scores.numpy(), maps.numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(["scores", "anomaly_maps"], {"images": images.astype(np.float32)})
    return scores, maps


def _metadata(predictor: Predictor, fmt: str, diff: float, n_checked: int) -> dict[str, Any]:
    meta = predictor.metadata
    return {
        "format": fmt, "file": FORMATS[fmt], "rayad_version": meta.get("rayad_version"),
        "image_size": predictor.image_size, "preprocessing": PREPROCESSING,
        "input": {"name": "images", "shape": ["batch", 3, predictor.image_size, predictor.image_size],
                  "dtype": "float32", "range": [0, 1]},
        "outputs": {"scores": "raw image score (batch,)", "anomaly_maps": "(batch, H, W)"},
        "threshold": meta["threshold"], "pixel_threshold": meta["pixel_threshold"],
        "normalization": meta["normalization"],
        "label_rule": "score >= threshold; normalized_score = (score - score_mean) / score_std; "
                      "mask = anomaly_map >= pixel_threshold",
        "parity": {"max_abs_difference": diff, "tolerance": TOLERANCE[fmt], "images_checked": n_checked},
        "model_precision": predictor.precision.precision,  # the parity is against the fp32 model, whatever this is
    }


def _embed_onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Also put the metadata inside the file (ONNX metadata_props), so the model travels alone."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"rayad": json.dumps(metadata), "threshold": repr(metadata["threshold"])})
    onnx.save(model, str(path))
