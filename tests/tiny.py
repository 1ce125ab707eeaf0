"""The tiny config every test trains with (seconds on 2 cores), as config overrides and as CLI flags."""

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
