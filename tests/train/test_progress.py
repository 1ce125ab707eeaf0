from rayad.train.loop import scaled_lr
from rayad.train.ray_train import ProgressCallback


def test_progress_line_has_step_loss_rate_and_eta(capsys):
    callback = ProgressCallback(total_steps=100)
    worker_metrics = {"loss": 0.01, "interval_images_per_s": 32.0, "world_size": 2}
    callback.after_report(None, [{**worker_metrics, "step": 10}], None)
    callback.after_report(None, [{**worker_metrics, "step": 20}], checkpoint=object())
    first, last = capsys.readouterr().out.strip().splitlines()
    assert first.endswith("ETA -")  # no rate yet (it said "ETA nans")
    assert last.startswith("[rayad] step 20/100 loss 0.01000 32.0 img/s (2 workers) ETA ")
    assert last.endswith("checkpoint")


def test_learning_rate_scales_with_sqrt_of_workers():
    assert scaled_lr(1e-3, 1) == 1e-3
    assert scaled_lr(1e-3, 4) == 2e-3
