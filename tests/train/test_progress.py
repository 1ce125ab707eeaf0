import json

import pytest

from rayad.train.loop import scaled_lr
from rayad.train.ray_train import RunLogCallback

WORKER_METRICS = {"loss": 0.01, "interval_images_per_s": 32.0, "world_size": 2}


def test_progress_line_has_step_loss_rate_and_eta(capsys, tmp_path):
    callback = RunLogCallback(total_steps=100, log_file=tmp_path / "train_log.jsonl")
    callback.after_report(None, [{**WORKER_METRICS, "step": 10}], None)
    callback.after_report(None, [{**WORKER_METRICS, "step": 20}], checkpoint=object())
    first, last = capsys.readouterr().out.strip().splitlines()
    assert first.endswith("ETA -")  # no rate yet (it said "ETA nans")
    assert last.startswith("[rayad] step 20/100 loss 0.01000 32.0 img/s (2 workers) ETA ")
    assert last.endswith("checkpoint")


@pytest.mark.parametrize("progress", [True, False])
def test_rank_zeros_reports_are_appended_to_the_run_log(capsys, tmp_path, progress):
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({**WORKER_METRICS, "step": 5}) + "\n")  # a run resumed after step 5
    callback = RunLogCallback(total_steps=100, log_file=log, progress=progress)
    callback.after_report(None, [{**WORKER_METRICS, "step": 10}, {**WORKER_METRICS, "loss": 0.5, "step": 10}], None)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {**WORKER_METRICS, "step": 5}, {**WORKER_METRICS, "step": 10}]
    assert bool(capsys.readouterr().out) == progress


def test_learning_rate_scales_with_sqrt_of_workers():
    assert scaled_lr(1e-3, 1) == 1e-3
    assert scaled_lr(1e-3, 4) == 2e-3
