"""Training telemetry: throughput, MFU and memory metrics, the run manifest, one W&B run per job.

`configure_wandb(recipe)` runs on every rank before the Trainer is built: it settles whether W&B is used (offline
without credentials, off when wandb is missing or disabled), sets the WANDB_* environment that `wandb.init` reads,
and on resume points WANDB_RUN_ID at the run stored in the checkpoint. `monitoring_callbacks(recipe, info,
use_wandb)` returns the callbacks to pass to the Trainer: `ThroughputCallback` (adds metrics to every training log)
followed, when W&B is used, by `WandbRunCallback` (transformers' WandbCallback, made failure-tolerant, plus the
recipe's values and the run manifest in the run config, run-id checkpointing and the adapter artifact). W&B is
taken out of the Trainer's `report_to` (medtune.training.trainer_arguments) so the Trainer does not add its own
WandbCallback ahead of ours: the throughput metrics must be in the log dict before W&B receives it.

Modules: flops (FLOP model, device peaks), throughput (the metrics callback), run_info (the run manifest),
wandb_run (the W&B run), logs (`setup_logging`, called by the entry point: console logging per rank).
"""

from __future__ import annotations

from transformers import TrainerCallback

from medtune.monitoring.flops import FlopModel, batch_counts, peak_flops
from medtune.monitoring.logs import EVERY_RANK, setup_logging
from medtune.monitoring.run_info import RUN_INFO_FILE, run_info, write_run_info
from medtune.monitoring.throughput import ThroughputCallback
from medtune.monitoring.wandb_run import RUN_ID_FILE, WandbRunCallback, configure_wandb, resume_run_id

__all__ = ["EVERY_RANK", "RUN_ID_FILE", "RUN_INFO_FILE", "FlopModel", "ThroughputCallback", "WandbRunCallback",
           "batch_counts", "configure_wandb", "monitoring_callbacks", "peak_flops", "resume_run_id", "run_info",
           "setup_logging", "write_run_info"]


def monitoring_callbacks(recipe, info: dict | None, use_wandb: bool) -> list[TrainerCallback]:
    """Callbacks for the Trainer, in order: metrics first, so W&B and the console see them in the same log.
    `info`: the run manifest (global rank 0) or None; `use_wandb`: what `configure_wandb` returned."""
    wandb = [WandbRunCallback(recipe, info)] if use_wandb else []
    return [ThroughputCallback(recipe.monitoring.peak_tflops), *wandb]
