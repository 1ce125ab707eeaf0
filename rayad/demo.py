"""The main job on the embedded default: demo data, then a search per demo category on local Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from rayad.baselines import nearest_neighbour_image_auroc
from rayad.cluster import connect
from rayad.data.demo import CATEGORIES, make_demo_dataset
from rayad.errors import Interrupted, RayadError
from rayad.evaluate import format_metric
from rayad.layout import BEST, EXPERIMENT, HISTORY, METRIC_NAMES, STUDY, SUMMARY, TRIALS, write_json
from rayad.settings import DEMO_SPACE, DEMO_TRIALS
from rayad.tune import SearchSettings, resolve_space, run_search
from rayad.tune.search import check_as_begun, plan_search, read_experiment_file, settings_of


def run_demo(out: str | Path, space: str = DEMO_SPACE, trials: int = DEMO_TRIALS,
             overrides: dict[str, Any] | None = None, address: str | None = None, config_file: str | Path | None = None,
             categories: tuple[str, ...] = CATEGORIES) -> dict[str, Any]:
    """Search each category (reusing finished experiments, resuming interrupted ones) and print a summary: of
    every category the folder holds, as `summary.json` records it."""
    out = Path(out).absolute()
    data_root = out / "data"

    def settings_for(category: str) -> SearchSettings:
        return SearchSettings(data_root=str(data_root), category=category, space=str(resolve_space(space)),
                              trials=trials, overrides=overrides or {},
                              config_file=str(config_file) if config_file else None)

    plan_search(settings_for(categories[0]))  # the flags, checked before the data is made or Ray starts
    missing = tuple(c for c in categories if not (data_root / c).is_dir())
    if missing:
        make_demo_dataset(data_root, categories=missing)
    connect(address, log_to_driver=False)  # the store prints one line per trial; Tune's tables stay off
    summary = _earlier_summary(out)
    for category in categories:
        start = time.perf_counter()
        exp = out / category
        settings = settings_for(category)
        experiment = _previous(exp, settings)
        finished = experiment is not None and experiment["status"] == "finished"
        if not finished:
            try:
                experiment = run_search(settings, exp, address, resume=experiment is not None, verbose=0)
            except Interrupted as e:
                raise Interrupted(f"{category}: {e.done}", "the same rayad demo command (finished categories "
                                  "are kept)") from None
        best = experiment["best"]
        summary[category] = {"trials": sum(experiment["trials"].values()),
                             "validation": next(iter(best["validation"].values())), **best["test"],
                             "nn_image_auroc": nearest_neighbour_image_auroc(data_root, category),
                             "seconds": summary[category]["seconds"] if finished and category in summary
                             else time.perf_counter() - start}
    write_json(out / SUMMARY, summary)
    print(_summary_table(summary))
    print(_next_commands(out, categories[0]))
    return summary


def _earlier_summary(out: Path) -> dict[str, Any]:
    """The summary an earlier demo left in `out`, of the categories whose experiments are still there: this run
    keeps them beside its own (a run with --categories adds to the folder's table)."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(summary, dict) or not all(map(_summary_row, summary.values())):
        return {}
    return {category: m for category, m in summary.items() if _finished(out / category)}


def _summary_row(row: Any) -> bool:
    """Whether `row` is a category's row as `run_demo` writes it: every column, each a number or null."""
    keys = {"trials", "validation", *METRIC_NAMES, "nn_image_auroc", "seconds"}
    return isinstance(row, dict) and keys <= row.keys() and all(row[k] is None or type(row[k]) in (int, float)
                                                                for k in keys)


def _finished(exp: Path) -> bool:
    """Whether `exp` holds a finished experiment (a search begun again there since may have stopped)."""
    try:
        return read_experiment_file(exp).get("status") == "finished"
    except RayadError:
        return False


def _previous(exp: Path, settings: SearchSettings) -> dict[str, Any] | None:
    """The category's experiment of an earlier run of the demo, which this run reuses or resumes: refused
    when it was searched with other settings."""
    if not (exp / EXPERIMENT).is_file():
        return None
    record = read_experiment_file(exp)
    before = settings_of(record, exp)
    if os.path.realpath(before.data_root) == os.path.realpath(settings.data_root):  # the same, or through a link
        before = dataclasses.replace(before, data_root=settings.data_root)
    changed = [f.name for f in dataclasses.fields(settings) if getattr(before, f.name) != getattr(settings, f.name)]
    if changed == ["data_root"]:  # not a flag: the folder moved
        raise RayadError(f"{exp}: an earlier demo searched it on {before.data_root}; a demo folder cannot move (its "
                         "experiments record where their data was): give a new --out")
    if changed:
        raise RayadError(f"{exp}: an earlier demo searched it with other {', '.join(changed)}; run the demo with "
                         "the flags it used, or give a new --out")
    check_as_begun(plan_search(settings), exp, record)  # the same files, but what they hold may have changed
    return record


def _summary_table(summary: dict[str, Any]) -> str:
    columns = ("validation", *METRIC_NAMES, "nn_image_auroc")
    header = f"{'category':<10}{'trials':>7}" + "".join(f"{c:>15}" for c in columns) + f"{'seconds':>9}"
    lines = ["", "best model per category (validation: the search's objective; the rest: test split; "
             "nn_image_auroc: the raw-pixel nearest-neighbour baseline)", header, "-" * len(header)]
    for category, m in summary.items():
        lines.append(f"{category:<10}{m['trials']:>7}" + "".join(f"{format_metric(m[c]):>15}" for c in columns)
                     + f"{m['seconds']:>9.0f}")
    means = {c: sum(m[c] or 0 for m in summary.values()) / len(summary) for c in columns}
    lines.append(f"{'mean':<10}{'':>7}" + "".join(f"{means[c]:>15.4f}" for c in columns))
    return "\n".join(lines)



def _next_commands(out: Path, category: str) -> str:
    run, data = out / category / BEST, out / "data"
    return (f"\nexperiments in {out}/<category> ({TRIALS}, {HISTORY}, {STUDY}, {BEST}/). Next:\n"
            f"  rayad dashboard --runs {out}   # browse trials, metrics and heatmaps at http://127.0.0.1:8501\n"
            f"  rayad serve --run {out}        # HTTP API for every category: POST /v1/predict?model={category}\n"
            f"  rayad evaluate --run {run} --data {data} --category {category}\n"
            f"  rayad predict --run {run} {data}/{category}/test/crack --out predictions.parquet\n"
            f"  rayad tune --data {data} --category {category} --space paper --trials 40 --out runs/{category}-paper")
