"""The main job on the embedded default: demo data, then train and evaluate each demo category."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rayad.artifact import METADATA, Predictor
from rayad.config import Config
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.evaluate import METRIC_NAMES, evaluate
from rayad.train import fit


def run_demo(out: Path, cfg: Config, categories: tuple[str, ...] = CATEGORIES) -> dict:
    """Train one model per demo category (reusing any finished one in `out`), evaluate, print a summary."""
    data_root = out / "data"
    if not all((data_root / c).is_dir() for c in categories):
        make_demo_dataset(data_root, categories=categories)
    summary = {}
    for category in categories:
        run = out / category
        start = time.perf_counter()
        if not (run / METADATA).is_file():
            fit(cfg, data_root, category, run, resume=True)
        metrics = evaluate(Predictor.load(run), data_root, category)
        (run / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        summary[category] = {k: metrics[k] for k in METRIC_NAMES} | {"seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(_summary_table(summary))
    print(f"\nmodels and metrics in {out}/<category>; score new images with:\n"
          f"  rayad predict --run {out}/{categories[0]} {data_root}/{categories[0]}/test --out predictions.parquet")
    return summary


def _summary_table(summary: dict) -> str:
    header = f"{'category':<10}" + "".join(f"{m:>13}" for m in METRIC_NAMES) + f"{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for category, m in summary.items():
        lines.append(f"{category:<10}" + "".join(f"{m[k]:>13.4f}" for k in METRIC_NAMES) + f"{m['seconds']:>9.0f}")
    means = {k: sum(m[k] for m in summary.values()) / len(summary) for k in METRIC_NAMES}
    lines.append(f"{'mean':<10}" + "".join(f"{means[k]:>13.4f}" for k in METRIC_NAMES))
    return "\n".join(lines)
