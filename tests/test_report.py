"""medtune-report: reads W&B offline runs (wandb's own reader) and trainer_state.json, plots what was logged."""

from __future__ import annotations

import json
import os
import time

import pytest

from medtune.monitoring.report import load_history, main, plot_report

LOSSES = [2.5, 2.0, 1.6, 1.3]


@pytest.fixture
def wandb_home(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    import wandb

    wandb.teardown()  # wandb keeps the settings (WANDB_DIR) of its first run in a process-wide singleton
    yield
    wandb.teardown()


def log_run(steps, losses, run_id="abc123", resume=None):
    """An offline run logged the way transformers' WandbCallback logs (train/..., eval/..., train/global_step)."""
    import wandb

    run = wandb.init(project="medtune", id=run_id, resume=resume)
    for step, loss in zip(steps, losses):
        run.log({"train/loss": loss, "train/tokens_per_second": 100.0 + step, "train/global_step": step})
        if step % 2 == 0:
            run.log({"eval/loss": loss + 0.5, "train/global_step": step})
    run.finish()
    return run.dir


def test_report_from_offline_wandb_run(wandb_home, tmp_path):
    log_run([1, 2, 3, 4], LOSSES)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    main(["--run", str(run_dir)])
    png = run_dir / "report.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    plotted = plot_report(load_history(run_dir), tmp_path / "again.png")
    assert plotted["loss"] == ([1, 2, 3, 4], LOSSES)
    assert plotted["eval_loss"] == ([2, 4], [LOSSES[1] + 0.5, LOSSES[3] + 0.5])
    assert plotted["tokens_per_second"] == ([1, 2, 3, 4], [101.0, 102.0, 103.0, 104.0])


def test_report_merges_resumed_segments_from_output_dir(wandb_home, tmp_path):
    # First job logs steps 1-3 and is preempted after a checkpoint at step 2; the requeued job logs 3-4 again.
    log_run([1, 2, 3], [2.5, 2.0, 9.9])
    time.sleep(1.1)  # run folders are named by the second they start in
    log_run([3, 4], LOSSES[2:], resume="allow")
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    plotted = plot_report(load_history(tmp_path), tmp_path / "report.png")
    assert plotted["loss"] == ([1, 2, 3, 4], LOSSES)


def test_report_from_trainer_state(tmp_path):
    history = [{"loss": loss, "tokens_per_second": 50.0, "step": step} for step, loss in enumerate(LOSSES, 1)]
    history.insert(2, {"eval_loss": 3.0, "step": 2})
    history.append({"train_runtime": 1.0, "step": 4})
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    main(["--run", str(tmp_path), "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "report.png").stat().st_size > 1000
    plotted = plot_report(load_history(tmp_path), tmp_path / "r.png")
    assert plotted["loss"] == ([1, 2, 3, 4], LOSSES)
    assert plotted["eval_loss"] == ([2], [3.0])


def test_report_without_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no W&B run"):
        load_history(tmp_path)
