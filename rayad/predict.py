"""`rayad predict`: score files and folders, write a Parquet table and optional heatmaps."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayad.artifact import Predictor
from rayad.data.images import IMAGE_SUFFIXES, decode_image
from rayad.errors import DataError
from rayad.visualize import heatmap_image

SCHEMA = pa.schema([("path", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
                    ("label", pa.bool_()), ("heatmap", pa.string()), ("error", pa.string())])


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to the images below them (recursively, sorted)."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def predict_paths(run: str | Path, paths: list[Path], out: Path | None = None, heatmaps: Path | None = None,
                  batch_size: int = 32) -> pa.Table:
    """One row per image (path, score, normalized_score, label, heatmap, error); bad files get an error."""
    predictor = Predictor.load(run)
    files = expand_paths(paths)
    preds, errors = predictor.predict_files(files, batch_size)
    normalized = predictor.model.normalized_score(torch.from_numpy(preds.scores)).numpy()
    rows, k = [], 0
    for path, error in zip(files, errors, strict=True):
        if error is not None:
            rows.append({"path": str(path), "score": None, "normalized_score": None, "label": None,
                         "heatmap": None, "error": error})
            continue
        heatmap = _write_heatmap(heatmaps, path, preds.maps[k], predictor.threshold) if heatmaps else None
        rows.append({"path": str(path), "score": float(preds.scores[k]), "normalized_score": float(normalized[k]),
                     "label": bool(preds.labels[k]), "heatmap": heatmap, "error": None})
        k += 1
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    return table


def _write_heatmap(folder: Path, path: Path, anomaly_map, threshold: float) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    size = decode_image(path).size
    target = folder / f"{path.stem}_heatmap.png"
    n = 1
    while target.exists():  # images with the same name in different folders
        target = folder / f"{path.stem}_heatmap_{n}.png"
        n += 1
    heatmap_image(anomaly_map, threshold, size).save(target)
    return str(target)
