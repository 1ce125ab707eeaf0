"""Dashboard render time for a large experiment (500 trials, 1,000 test images), cold and warm cache.

The experiment is written by rayad's own writers, so every file has the real format: the quick space's
plan and experiment record, an Optuna SQLite study of N trials (random sampler), trials.parquet and
history.parquet from the ResultsStore callback fed with each trial's evaluations, and a best model (the
quick space's network, calibrated, untrained: render time does not depend on the weights) evaluated for
real on 1,000 demo test images. Only the validation values are synthetic (a smooth function of the
parameters plus noise, rising over evaluations; ~70% of trials stopped early as ASHA would).

Measured, per page (Search and Gallery), in one run on one machine:
  1. the page script in Streamlit's AppTest (server side): cold = caches cleared, warm = the next session;
  2. time to first full render in headless Chromium against `rayad dashboard`: cold = the first visit
     after the server started, warm = a new visit (a new session; Streamlit's caches are process-wide),
     from navigation until the script has finished and every chart and image is drawn.

    python benchmarks/dashboard_load.py [--trials 500] [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import streamlit as st
from streamlit.testing.v1 import AppTest

from rayad.artifact import build_anomaly_model, save_artifact
from rayad.cli import count, run_script
from rayad.data.defects import DEFECTS
from rayad.data.demo import make_demo_dataset
from rayad.evaluate import METRIC_NAMES, evaluate
from rayad.layout import BEST, EVALUATION, EXPERIMENT, STUDY, TEST_METRICS, TRIALS, TRIALS_DIR, VAL_METRICS, write_json
from rayad.precision import cpu_summary
from rayad.tune import SearchSettings, resolve_space
from rayad.tune.search import experiment_record, plan_search
from rayad.tune.store import ResultsStore, read_rows

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
PAGES = {"search": 4, "gallery": 60}  # page -> charts or images a full render shows
TARGET_WARM_S = 2.0


def build_experiment(root: Path, n_trials: int, n_images: int) -> Path:
    per_defect = n_images // 2 // len(DEFECTS)
    data = make_demo_dataset(root / "data", n_train=16, n_test_good=n_images - per_defect * len(DEFECTS),
                             n_per_defect=per_defect, categories=("brick",))
    plan = plan_search(SearchSettings(data_root=str(data), category="brick", space=str(resolve_space("quick")),
                                      trials=n_trials))
    exp = root / "runs" / "brick-large"
    exp.mkdir(parents=True)
    record = experiment_record(plan, 2, exp)
    study = optuna.create_study(storage=f"sqlite:///{exp / STUDY}", study_name="brick", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    store = ResultsStore(exp, plan.metrics[0], plan.modes[0], plan.max_iterations,
                         [p.key for p in plan.space.searched], plan.space.default_point(plan.base),
                         str(exp / TRIALS_DIR))
    store.setup()
    rng = np.random.default_rng(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the store prints a line per trial
        for i in range(n_trials):
            trial = study.ask()
            plan.space.define_by_run(trial)
            study.tell(trial, _feed_trial(store, f"{i:08x}", trial.params, plan.max_iterations, rng))
    model = build_anomaly_model(plan.base)
    good = rng.uniform(0.001, 0.01, 64)
    model.calibrate(good, 2 * good)
    save_artifact(model, plan.base, exp / BEST)
    test = evaluate(exp / BEST, data, "brick")
    write_json(exp / BEST / TEST_METRICS, test)
    rows = read_rows(exp / TRIALS)
    best = max(rows, key=lambda r: r["best_value"])
    record.update(status="finished", finished_at=time.time(), best={
        "trial_id": best["trial_id"], "validation": {plan.metrics[0]: best["best_value"]}, "step": best["best_step"],
        "params": {k: v for k, v in best.items() if k.startswith("config/")},
        "test": {k: test[k] for k in METRIC_NAMES}})
    write_json(exp / EXPERIMENT, record)
    return exp


def _feed_trial(store: ResultsStore, trial_id: str, params: dict, max_iterations: int,
                rng: np.random.Generator) -> float:
    """Report a trial's evaluations to the store as Tune would; returns its last value (told to Optuna)."""
    trial = SimpleNamespace(trial_id=trial_id, config=params, error_file=None)
    quality = 0.6 + 0.3 * params["corruption.p_corrupt"] - 20 * abs(params["train.lr"] - 0.003)
    evaluations = max_iterations if rng.random() < 0.3 else int(rng.integers(1, max_iterations))
    store.on_trial_start(0, [], trial)
    for it in range(1, evaluations + 1):
        value = float(np.clip(quality * (1 - 0.5 ** it) + rng.normal(0, 0.02), 0, 1))
        store.on_trial_result(0, [], trial, {EVALUATION: it, "step": 75 * it, "loss": 0.01 / it,
                                             **{m: value for m in VAL_METRICS}, "time_total_s": 12.0 * it,
                                             "interval_images_per_s": 100.0})
    store.on_trial_complete(0, [], trial)
    return value


def apptest_seconds(runs: Path, page: str) -> tuple[float, float]:
    """(cold, warm) seconds of the page script in AppTest."""
    os.environ["RAYAD_RUNS"] = str(runs)
    st.cache_data.clear()
    st.cache_resource.clear()
    times = []
    for _ in range(2):
        at = AppTest.from_file(str(APP), default_timeout=600)
        at.run()
        start = time.perf_counter()
        at.switch_page(f"app_pages/{page}.py").run()
        times.append(time.perf_counter() - start)
        assert not at.exception, at.exception
    return times[0], times[1]


def browser_seconds(runs: Path) -> dict[str, tuple[float, float]]:
    """Per page, (cold, warm) seconds to a full render in Chromium, against a freshly started server."""
    from playwright.sync_api import sync_playwright

    with _dashboard(runs) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        times = {name: tuple(_render(page, f"{url}/{name}", n) for _ in range(2)) for name, n in PAGES.items()}
        browser.close()
    return times


def _render(page, url: str, expected: int) -> float:
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_function("""(expected) => {
        const app = document.querySelector('[data-testid="stApp"]');
        if (!app || app.dataset.testScriptState !== 'notRunning' || !document.querySelector('h1')) return false;
        const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
        const images = [...document.querySelectorAll('[data-testid="stImage"] img')];
        if (charts.length + images.length < expected) return false;
        return charts.every(c => c.querySelector('canvas, svg')) && images.every(i => i.complete && i.naturalWidth);
    }""", arg=expected, timeout=600_000, polling=50)
    elapsed = time.perf_counter() - start
    assert page.locator('[data-testid="stException"]').count() == 0
    return elapsed


@contextlib.contextmanager
def _dashboard(runs: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rayad = Path(sys.executable).with_name("rayad")
    process = subprocess.Popen([str(rayad), "dashboard", "--runs", str(runs), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                break
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=count, default=500)
    parser.add_argument("--images", type=count, default=1000)
    parser.add_argument("--repeats", type=count, default=3, help="fresh servers / cleared caches per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("RAYAD_CACHE_DIR", str(Path(tmp) / "cache"))
        start = time.perf_counter()
        exp = build_experiment(Path(tmp), args.trials, args.images)
        print(f"built {exp.name}: {args.trials} trials, {args.images} test images in "
              f"{time.perf_counter() - start:.0f} s")
        script = {name: [apptest_seconds(exp.parent, name) for _ in range(args.repeats)] for name in PAGES}
        browser = [browser_seconds(exp.parent) for _ in range(args.repeats)] if shutil.which("chromium") else []
    print(f"\nmachine: {cpu_summary()}, {os.cpu_count()} CPUs; median of "
          f"{args.repeats}; target: warm full render under {TARGET_WARM_S:g} s")
    print(f"{'page':<9}{'measure':<26}{'cold s':>8}{'warm s':>8}{'warm/cold':>11}")
    for name in PAGES:
        rows = [("script (AppTest)", script[name])]
        rows += [("full render (Chromium)", [b[name] for b in browser])] if browser else []
        for label, runs in rows:
            cold, warm = (statistics.median(r[i] for r in runs) for i in (0, 1))
            print(f"{name:<9}{label:<26}{cold:>8.2f}{warm:>8.2f}{warm / cold:>11.2f}")


if __name__ == "__main__":
    run_script(main)
