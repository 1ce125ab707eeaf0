import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from rayad.config import TrainConfig
from rayad.errors import ArtifactError, DataError, RayadError
from rayad.settings import cpu_count
from rayad.train import fit
from rayad.train import loop as loop_module
from rayad.train.loop import batch_indices, lr_at


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] >= 0.05


def test_batches_cover_each_epoch_once_and_are_deterministic():
    n, bs = 10, 4
    seen = np.concatenate([batch_indices(n, bs, step, seed=3) for step in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert np.array_equal(batch_indices(n, bs, 2, 3), batch_indices(n, bs, 2, 3))
    assert not np.array_equal(batch_indices(n, bs, 0, 3), batch_indices(n, bs, 0, 4))


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def test_same_seed_same_weights(tmp_path, demo_root, tiny_config):
    a = fit(tiny_config, demo_root, "brick", tmp_path / "a", progress=False)
    b = fit(tiny_config, demo_root, "brick", tmp_path / "b", progress=False)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    history = [json.loads(line) for line in (a / "train_log.jsonl").read_text().splitlines()]
    tc = tiny_config.train
    logged = [s for s in range(1, tc.steps + 1) if s % tc.log_every == 0 or s % tc.checkpoint_every == 0]
    assert [h["step"] for h in history] == logged  # every log interval and every checkpoint
    assert all(h["world_size"] == 1 and h["loss"] > 0 for h in history)
    assert json.loads((a / "model.json").read_text())["train"]["threads"] == cpu_count()  # the count used


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, demo_root, tiny_config, monkeypatch):
    full = fit(tiny_config, demo_root, "brick", tmp_path / "full", progress=False)
    real_step, calls = loop_module.train_step, []

    def crash_after_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the checkpoint at step 3 is written, steps 4.. are lost
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_config, demo_root, "brick", tmp_path / "cut", progress=False)
    monkeypatch.setattr(loop_module, "train_step", real_step)
    with pytest.raises(RayadError, match="--resume"):
        fit(tiny_config, demo_root, "brick", tmp_path / "cut", progress=False)
    began_in = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000003" / "state.json").read_text())["precision"]

    def decided_otherwise(*args, **kwargs):  # as a probe of another cache, machine or torch would
        raise AssertionError("auto decided anew on --resume; the run began in " + began_in)

    monkeypatch.setattr(loop_module, "resolve", decided_otherwise)
    resumed = fit(tiny_config, demo_root, "brick", tmp_path / "cut", resume=True, progress=False)
    assert {json.loads(line)["precision"] for line in (resumed / "train_log.jsonl").read_text().splitlines()} == {
        began_in}
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # step 4, logged before the stop and again after the resume from step 3, is logged once
    assert _logged_steps(resumed) == _logged_steps(full) == [2, 3, 4, 6]


def _logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_run_stopped_before_writing_its_model_resumes_and_writes_it(tmp_path, demo_root, tiny_config):
    """The last step's checkpoint comes before calibration: a run stopped in between was refused by --resume
    ('already reached step 6') and by a new run ('already holds checkpoints')."""
    run = fit(tiny_config, demo_root, "brick", tmp_path / "r", progress=False)
    weights, meta = _weights(run), json.loads((run / "model.json").read_text())
    (run / "model.json").unlink()
    (run / "model.safetensors").unlink()
    with (run / "train_log.jsonl").open("a") as log:
        log.write('{"step": 6, "lo')  # a line a kill cut short
    fit(tiny_config, demo_root, "brick", run, resume=True, progress=False)
    again = json.loads((run / "model.json").read_text())
    assert all(torch.equal(weights[k], _weights(run)[k]) for k in weights)
    assert again["threshold"] == meta["threshold"] and again["pixel_threshold"] == meta["pixel_threshold"]
    assert again["train"]["final_loss"] == meta["train"]["final_loss"] is not None
    assert _logged_steps(run) == [2, 3, 4, 6]


def test_a_run_given_more_steps_and_stopped_before_its_new_model_resumes_and_writes_it(tmp_path, demo_root,
                                                                                         tiny_config):
    """Its folder held the model of fewer steps beside the last checkpoint: --resume said 'already reached step 9',
    and that older model stayed."""
    shorter = fit(tiny_config, demo_root, "brick", tmp_path / "r", progress=False)
    old_model = {name: (shorter / name).read_bytes() for name in ("model.json", "model.safetensors")}
    longer = fit(tiny_config.replace({"train.steps": 9}), demo_root, "brick", shorter, resume=True, progress=False)
    weights = {k: v.clone() for k, v in _weights(longer).items()}  # not views of the file rewritten below
    for name, content in old_model.items():  # as a stop between the last checkpoint and the new model leaves it
        (longer / name).write_bytes(content)
    fit(tiny_config.replace({"train.steps": 9}), demo_root, "brick", longer, resume=True, progress=False)
    assert json.loads((longer / "model.json").read_text())["train"]["steps"] == 9
    assert all(torch.equal(weights[k], _weights(longer)[k]) for k in weights)


def test_resume_refuses_what_would_change_the_run_and_leaves_its_files_as_they_were(tmp_path, demo_root, tiny_config):
    run = fit(tiny_config, demo_root, "brick", tmp_path / "r", progress=False)
    files = {name: (run / name).read_bytes() for name in ("model.json", "manifest.parquet", "model.safetensors")}
    refused = [
        (tiny_config.replace({"model.skip": "add"}), "brick",
         r"different configuration \(model.skip: 'ccm' then, 'add' now\)"),
        (tiny_config.replace({"train.steps": 12}), "grass", "trained on other images"),
        (tiny_config, "grass", "trained on other images"),  # not "raise --steps", as it said
        (tiny_config, "brick", "already reached step 6, and train.steps is 6; raise --steps"),
        (tiny_config.replace({"train.steps": 4}), "brick", "already reached step 6"),
    ]
    for cfg, category, message in refused:
        with pytest.raises(RayadError, match=message):
            fit(cfg, demo_root, category, run, resume=True, progress=False)
        assert all((run / name).read_bytes() == content for name, content in files.items()), message
    # the dataset moved: the same images, found by their paths below the data root
    moved = tmp_path / "moved"
    shutil.copytree(demo_root / "brick", moved / "brick")
    longer = fit(tiny_config.replace({"train.steps": 9}), moved, "brick", run, resume=True, progress=False)
    assert json.loads((longer / "model.json").read_text())["train"]["steps"] == 9


def test_a_run_without_checkpoints_is_neither_resumed_nor_overwritten(tmp_path, demo_root, tiny_config):
    run = fit(tiny_config, demo_root, "brick", tmp_path / "r", progress=False)
    shutil.rmtree(run / "checkpoints")
    files = {path: path.read_bytes() for path in run.iterdir()}
    with pytest.raises(RayadError, match="already holds a model; train into a new folder"):
        fit(tiny_config.replace({"train.lr": 1e-2}), demo_root, "brick", run, progress=False)
    with pytest.raises(RayadError, match="already holds a model and no checkpoint to resume; train into a new"):
        fit(tiny_config, demo_root, "brick", run, resume=True, progress=False)  # "train without --resume" said
    with pytest.raises(RayadError, match="no checkpoint to resume; train without --resume"):  # a mistyped --out
        fit(tiny_config, demo_root, "brick", tmp_path / "typo", resume=True, progress=False)
    assert {path: path.read_bytes() for path in run.iterdir()} == files and not (tmp_path / "typo").exists()
    # stopped before its first checkpoint: it starts again, and so does its log
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "train_log.jsonl").write_text('{"step": 2, "loss": 1.0}\n' * 3)
    fit(tiny_config, demo_root, "brick", stopped, progress=False)
    steps = [json.loads(line)["step"] for line in (stopped / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]


def test_a_run_refused_for_its_data_leaves_no_folder(tmp_path, demo_root, tiny_config):
    """The data is checked before the run's first write (it left manifest.parquet behind)."""
    data = tmp_path / "data"
    shutil.copytree(demo_root / "brick", data / "brick", ignore=shutil.ignore_patterns("validation"))
    with pytest.raises(RayadError, match=r"no validation image\(s\) .*needs 2 \(set data.val_fraction > 0\)"):
        fit(tiny_config.replace({"data.val_fraction": 0.0}), data, "brick", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    shutil.copytree(demo_root / "brick" / "validation", data / "brick" / "validation")
    unreadable = list((data / "brick" / "validation" / "good").iterdir())
    for image in unreadable:
        image.write_bytes(b"not an image")
    n = len(unreadable)
    with pytest.raises(RayadError, match=f"no validation image.* \\({n} of the {n} listed could not be read"):
        fit(tiny_config.replace({"data.on_bad_image": "skip"}), data, "brick", tmp_path / "run", progress=False)
    for image in unreadable[1:]:  # one image: its scores' standard deviation is 0, normalised scores were ~1e9
        image.unlink()
    shutil.copy(demo_root / "brick" / "validation" / "good" / unreadable[0].name, unreadable[0])
    with pytest.raises(RayadError, match="1 validation image.* needs 2 .*validation folder holds 1; add images to it"):
        fit(tiny_config, data, "brick", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    shutil.copytree(demo_root / "brick" / "train" / "good", data / "plain" / "good")  # a folder layout has no
    with pytest.raises(RayadError, match=r"add images to good/ or lower data.test_fraction \(0.9\)"):  # validation/
        fit(tiny_config.replace({"data.layout": "folder", "data.test_fraction": 0.9}), data, "plain", tmp_path / "run",
            progress=False)


def test_a_run_whose_loss_turns_nan_stops_and_writes_no_model(tmp_path, demo_root, tiny_config, monkeypatch):
    real = loop_module.reconstruction_loss
    monkeypatch.setattr(loop_module, "reconstruction_loss", lambda *args: real(*args) * float("nan"))  # diverged
    with pytest.raises(RayadError, match=r"training diverged: the loss is nan at step 2; lower train.lr \(now "):
        fit(tiny_config, demo_root, "brick", tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "model.json").exists()


def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, demo_root, tiny_config):
    run = fit(tiny_config, demo_root, "brick", tmp_path / "r", progress=False)
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    (latest / "model.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match=f"{latest}: damaged checkpoint .*delete it to resume from the one before"):
        fit(tiny_config.replace({"train.steps": 9}), demo_root, "brick", run, resume=True, progress=False)
    log = (run / "train_log.jsonl").read_bytes()
    for state, damage in [("{", "JSONDecodeError"), ('{"step": -2, "config": {}}', "step is -2, not a step count"),
                          ('{"step": true, "config": {}}', "step is True, not a step count")]:
        (latest / "state.json").write_text(state)
        with pytest.raises(ArtifactError, match=f"damaged checkpoint .*{damage}"):
            fit(tiny_config.replace({"train.steps": 9}), demo_root, "brick", run, resume=True, progress=False)
        assert (run / "train_log.jsonl").read_bytes() == log  # a step of -2 cut the log, then failed in numpy
    shutil.rmtree(latest)
    earlier = sorted((run / "checkpoints").glob("step_*"))[-1]
    moments = load_file(str(earlier / "optimizer.safetensors"))
    for key, value, damage in [("0/exp_avg", torch.zeros(1), r"0/exp_avg has shape \(1,\), its parameter \("),
                               ("0/exp_avg", torch.tensor(0.0), r"0/exp_avg has shape \(\), its parameter \("),
                               ("999/exp_avg", torch.zeros(1), "parameter 999")]:
        save_file({**moments, key: value}, str(earlier / "optimizer.safetensors"))
        with pytest.raises(ArtifactError, match=f"{earlier}: damaged checkpoint .*{damage}"):  # not the first step's
            fit(tiny_config.replace({"train.steps": 9}), demo_root, "brick", run, resume=True, progress=False)
    save_file(moments, str(earlier / "optimizer.safetensors"))
    (run / "manifest.parquet").write_text("x")
    with pytest.raises(DataError, match="manifest.parquet: damaged .*it lists the images the run was trained on"):
        fit(tiny_config.replace({"train.steps": 9}), demo_root, "brick", run, resume=True, progress=False)


def test_train_step_under_bf16_autocast_keeps_float32_loss_and_learns():
    """The GPU path runs the network under bf16 autocast; CPU autocast exercises the same dtype handling."""
    from rayad.config import Config
    from rayad.corruption import Corruptor
    from rayad.models import create_model
    from rayad.train.loop import make_optimizer, step_generator, train_step

    cfg = Config().replace({"model.widths": [8, 16], "model.dilations": [1]})
    model = create_model(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    before = [p.detach().clone() for p in model.parameters()]
    clean = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = train_step(model, optimizer, Corruptor(cfg.corruption), clean, step_generator(0, 0, "cpu"),
                          cfg.train, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("mode, count", [("flip", 4), ("dihedral", 8)])
def test_augment_gives_flips_and_quarter_turns(mode, count):
    from rayad.train.loop import augment, step_generator

    image = torch.arange(9.0).view(1, 1, 3, 3)
    batch = image.expand(64, 1, 3, 3)
    out = augment(batch, mode, step_generator(0, 0, "cpu"))
    seen = {tuple(o.flatten().tolist()) for o in out}
    dihedral = {tuple(torch.rot90(t, k, (-2, -1)).flatten().tolist())
                for t in (image, image.flip(-1)) for k in range(4)}
    assert len(seen) == count and seen <= dihedral  # only the symmetries of the square, all of them drawn
    assert torch.equal(augment(batch, "none", step_generator(0, 0, "cpu")), batch)
    assert torch.equal(out, augment(batch, mode, step_generator(0, 0, "cpu")))  # seeded


def test_a_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    """A resumed fp16 run started its loss scale again at 2**16 and skipped steps until it came down."""
    from rayad.config import Config
    from rayad.train.checkpoint import load_checkpoint, save_checkpoint

    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(network.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10)
    scaler.scale(network(torch.ones(1, 3)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()  # one finite step: the growth tracker counts it
    save_checkpoint(tmp_path / "ckpt", network, optimizer, 1, Config(), scaler)
    resumed = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "ckpt", torch.nn.Linear(3, 2), torch.optim.AdamW(network.parameters()), resumed)
    assert resumed.state_dict() == scaler.state_dict() and resumed.get_scale() == 1024.0
    save_checkpoint(tmp_path / "fp32", network, optimizer, 1, Config())  # no scaler: state.json as before
    assert "grad_scaler" not in json.loads((tmp_path / "fp32" / "state.json").read_text())
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "fp32", network, optimizer, fresh)  # switched to fp16: a new scale
    assert fresh.get_scale() == 2.0**16


def test_a_trial_resumed_at_its_last_checkpoint_reports_that_evaluation_again(tmp_path, demo_root, tiny_config):
    """Stopped after its last checkpoint, a search's trial trains no step when it resumes: its attempt reported
    nothing, and ASHA failed the search ("did not include the specified metric(s)")."""
    from rayad.layout import EVALUATION
    from rayad.train.loop import LocalSession, LoopConfig, train_loop

    loop = LoopConfig(tiny_config, str(demo_root), "brick", validate=True)
    session = LocalSession(tiny_config, tmp_path, torch.device("cpu"), progress=False)
    _, first = train_loop(loop, session)
    _, again = train_loop(loop, LocalSession(tiny_config, tmp_path, torch.device("cpu"), progress=False))
    reports = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert again["step"] == first["step"] == tiny_config.train.steps and reports[-1] == again
    assert again[EVALUATION] == first[EVALUATION] and again["val_image_auroc"] == first["val_image_auroc"]


def test_a_run_that_calibrated_on_one_carved_image_says_why_it_cannot_resume(tmp_path, demo_root, tiny_config):
    """Earlier versions carved one validation image from a small training set; rayad now carves two, so the
    manifest differs, and 'trained on other images' sent the user to look for a change they had not made."""
    data = tmp_path / "data"
    shutil.copytree(demo_root / "brick", data / "brick", ignore=shutil.ignore_patterns("validation"))
    run = fit(tiny_config, data, "brick", tmp_path / "run", progress=False)
    manifest = pq.read_table(run / "manifest.parquet")
    splits = manifest["split"].to_pylist()
    splits[splits.index("val")] = "train"  # as an earlier rayad carved it
    pq.write_table(manifest.set_column(manifest.schema.get_field_index("split"), "split", pa.array(splits)),
                   run / "manifest.parquet")
    with pytest.raises(RayadError, match="calibrates on 1 validation image, carved by an earlier rayad; rayad now"):
        fit(tiny_config.replace({"train.steps": 9}), data, "brick", run, resume=True, progress=False)


@pytest.mark.parametrize("record", ["experiment.json", "trials.parquet", "rayad_export.json"])
def test_a_search_or_an_export_folder_is_no_place_for_a_run(tmp_path, demo_root, tiny_config, record):
    """A run trained into a search's folder replaced its manifest and became the model `serve` found there."""
    (tmp_path / record).write_text("{}")
    with pytest.raises(RayadError, match=rf"holds an? (search|export) \({record}\); train into a new folder"):
        fit(tiny_config, demo_root, "brick", tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [record]


def test_a_workers_run_stopped_before_its_first_checkpoint_leaves_the_folder_free(tmp_path, demo_root, tiny_config):
    """Its workers_run.json refused a new run, advising a resume that was then refused: nothing to resume."""
    (tmp_path / "workers_run.json").write_text('{"storage": null}')
    fit(tiny_config, demo_root, "brick", tmp_path, progress=False)
    assert not (tmp_path / "workers_run.json").exists() and (tmp_path / "model.json").is_file()
