"""Exported graphs against the PyTorch model they came from, on a category's test images.

    python benchmarks/export_parity.py RUN_DIR [RUN_DIR ...] --data DEMO_ROOT

Each RUN_DIR is a model artifact trained on the category named by its folder. For TorchScript and ONNX, prints
the export's own check (the largest absolute difference of scores and maps to the fp32 PyTorch graph, on the test
images) and how far the exported scores are from `rayad predict`'s in fp32 and in bf16 scoring (exports are fp32
graphs): the largest difference relative to the score and to the image threshold, and the image labels that
differ. With the CPU named.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from rayad.artifact import Predictor
from rayad.cli import run_script
from rayad.data.dataset import load_split, to_tensor
from rayad.data.manifest import build_manifest
from rayad.export import FORMATS, export_model, run_exported
from rayad.precision import cpu_summary


def compare(run: Path, data_root: Path) -> list[dict]:
    fp32 = Predictor.load(run, device="cpu", precision="fp32")
    test = load_split(build_manifest(data_root, run.name, fp32.config.data), "test", fp32.image_size)
    scored = {p: Predictor.load(run, device="cpu", precision=p).predict_arrays(test.images).scores
              for p in ("fp32", "bf16")}
    threshold = fp32.metadata["threshold"]
    rows = []
    for fmt in FORMATS:
        with tempfile.TemporaryDirectory() as tmp:
            meta = export_model(run, fmt, Path(tmp) / fmt, check_images=test.images)
            exported, _ = run_exported(Path(tmp) / fmt / FORMATS[fmt], fmt, to_tensor(test.images).numpy())
        row = {"category": run.name, "format": fmt, "n": len(exported),
               "check": meta["parity"]["max_abs_difference"], "tolerance": meta["parity"]["tolerance"]}
        for precision, scores in scored.items():
            row[f"rel_{precision}"] = float(np.max(np.abs(exported - scores) / np.abs(scores)))
            row[f"thr_{precision}"] = float(np.max(np.abs(exported - scores)) / threshold)
            row[f"flips_{precision}"] = int(np.sum((exported >= threshold) != (scores >= threshold)))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    rows = [row for run in args.runs for row in compare(run, args.data)]
    print(f"machine: {cpu_summary()}")
    print("| category | format | images | export check: max abs difference (tolerance) | exported / predict fp32: "
          "max score difference relative to the score, to the threshold; labels differing | "
          "exported / predict bf16: same |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['category']} | {r['format']} | {r['n']} | {r['check']:.2g} ({r['tolerance']:g}) | "
              f"{r['rel_fp32']:.2g}, {r['thr_fp32']:.2g}; {r['flips_fp32']} | "
              f"{r['rel_bf16']:.2g}, {r['thr_bf16']:.2g}; {r['flips_bf16']} |")


if __name__ == "__main__":
    run_script(main)
