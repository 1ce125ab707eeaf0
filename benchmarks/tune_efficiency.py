"""Search efficiency on the demo data: trials per hour, ASHA against running every trial to the end, and
what the search buys over the default config.

For each category, two experiments with the same space, seed and trial count run back to back on one
local Ray: FIFO (every trial to the end) and ASHA. Reported, measured in this run:
  - trials/hour of each;
  - compute spent (trial-steps) and best validation score, ASHA / FIFO;
  - test metrics of the default config (the FIFO experiment's first trial, trained to the end, exported
    like the best one) against the best ASHA model.

    python benchmarks/tune_efficiency.py --out runs/bench-tune [--trials 6] [--categories brick grass gravel]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from rayad.cli import count, run_script
from rayad.cluster import connect
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.evaluate import format_metric
from rayad.layout import METRIC_NAMES, TRIALS
from rayad.precision import cpu_summary
from rayad.tune import SearchSettings, resolve_space, run_search
from rayad.tune.search import export_best, plan_search


def run_pair(data_root: Path, category: str, out: Path, space: str, trials: int, seed: int) -> dict:
    result = {}
    for scheduler in ("fifo", "asha"):
        settings = SearchSettings(data_root=str(data_root), category=category, space=str(resolve_space(space)),
                                  trials=trials, scheduler=scheduler, search_seed=seed)
        start = time.perf_counter()
        record = run_search(settings, out / f"{category}-{scheduler}", verbose=0)
        seconds = time.perf_counter() - start
        rows = pq.read_table(out / f"{category}-{scheduler}" / TRIALS).to_pylist()
        result[scheduler] = {"seconds": seconds, "trials_per_hour": len(rows) / seconds * 3600,
                             "trial_steps": sum(r["steps"] or 0 for r in rows),
                             "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
                             "best_val": max(r["best_value"] for r in rows if r["best_value"] is not None),
                             "test": record["best"]["test"]}
        if scheduler == "fifo":
            default = next(r for r in rows if r["is_default"])
            test = export_best(plan_search(settings), default, out / f"{category}-fifo" / "default")
            result["default"] = {"val": default["best_value"], "test": {k: test[k] for k in METRIC_NAMES}}
    return result


def report(results: dict, trials: int, space: str) -> str:
    lines = [f"machine: {cpu_summary()}, {_cpus()} CPUs; space {space}, "
             f"{trials} trials per experiment", "",
             f"{'category':<9}{'FIFO trials/h':>14}{'ASHA trials/h':>14}{'steps ASHA/FIFO':>16}"
             f"{'best val FIFO':>14}{'best val ASHA':>14}{'ASHA/FIFO':>10}"]
    for cat, r in results.items():
        f, a = r["fifo"], r["asha"]
        lines.append(f"{cat:<9}{f['trials_per_hour']:>14.1f}{a['trials_per_hour']:>14.1f}"
                     f"{a['trial_steps'] / f['trial_steps']:>16.2f}{f['best_val']:>14.4f}{a['best_val']:>14.4f}"
                     f"{a['best_val'] / f['best_val']:>10.3f}")
    lines += ["", f"{'category':<9}{'model':<16}" + "".join(f"{m:>13}" for m in METRIC_NAMES)]
    for cat, r in results.items():
        for name, test in (("default config", r["default"]["test"]), ("best (ASHA)", r["asha"]["test"]),
                           ("best (FIFO)", r["fifo"]["test"])):
            lines.append(f"{cat:<9}{name:<16}" + "".join(f"{format_metric(test[m]):>13}" for m in METRIC_NAMES))
    return "\n".join(lines)



def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-tune"))
    parser.add_argument("--trials", type=count, default=6)
    parser.add_argument("--space", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    args = parser.parse_args()
    data_root = args.out.absolute() / "data"
    if not all((data_root / c).is_dir() for c in args.categories):
        make_demo_dataset(data_root, categories=tuple(args.categories))
    connect(None, log_to_driver=False)
    results = {c: run_pair(data_root, c, args.out.absolute(), args.space, args.trials, args.seed)
               for c in args.categories}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results, args.trials, args.space))


if __name__ == "__main__":
    run_script(main)
