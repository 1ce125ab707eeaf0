"""The tiny config every test trains with (seconds on 2 cores), as config overrides and as CLI flags, and a
tiny training stopped with SIGTERM."""

import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = {
    "data.image_size": 32,
    "model.widths": [8, 16],
    "model.dilations": [1, 2],
    "train.steps": 6,
    "train.batch_size": 4,
    "train.warmup_steps": 2,
    "train.checkpoint_every": 3,
    "train.log_every": 2,
    "scoring.sigma": 1.0,
}

# TINY without the budget keys, which a search space fixes
TINY_BASE = {k: v for k, v in TINY.items() if k not in ("train.steps", "train.checkpoint_every", "train.log_every")}

TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]

SEARCH_STEPS = 4  # the tiny experiment's --set train.steps, under the tiny space's fixed 6


def sigterm_after_first_checkpoint(demo_root: Path, run: Path, checkpoints: str, *flags: str, timeout: float = 120,
                                   **popen) -> tuple[int, str]:
    """`rayad train` of the tiny model with a budget it never reaches, in its own process: SIGTERM once a file
    matching `checkpoints` (a glob under `run`) exists. Returns its exit code and stderr."""
    budget = {**TINY, "train.steps": 10**6, "train.checkpoint_every": 20}
    args = [sys.executable, "-m", "rayad.cli", "train", "--data", str(demo_root), "--category", "brick", "--out",
            str(run), *flags, *[arg for key, value in budget.items() for arg in ("--set", f"{key}={value}")]]
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + timeout
    while not list(run.glob(checkpoints)):
        assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=timeout)
    return driver.returncode, err
