"""Preemptible training: stop at a step boundary on SIGUSR1/SIGTERM, save a full checkpoint, requeue, resume.

Slurm warns a job before it ends it (`#SBATCH --signal=B:USR1@300` in slurm/train.sbatch, SIGTERM on preemption
or scancel). `PreemptionCallback` turns that signal into "save and stop at the end of this step" on every rank, so
the checkpoint holds everything the Trainer needs for an exact resume (adapter, optimizer, scheduler, RNG states,
global step -> data position). `requeue_if_preempted()` then puts the job back in the queue, and the requeued job
resumes from `find_resume_checkpoint(output_dir)`.

Trainer writes a checkpoint folder piece by piece (weights, optimizer shards of every rank, RNG state per rank,
trainer_state.json) with no atomic rename, so a job killed mid-save leaves a folder that looks complete but is not.
After all ranks have saved, rank 0 writes COMPLETE_MARKER into the folder; only marked folders are resumed from.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from medtune.checkpoints import checkpoints

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_preempted = False  # set once the ranks have agreed to stop for a signal


def find_resume_checkpoint(output_dir: str) -> str | None:
    """Newest checkpoint-<step> folder of output_dir whose save finished on every rank, or None."""
    return next((str(p) for p in checkpoints(output_dir) if (p / COMPLETE_MARKER).is_file()), None)


def requeue_if_preempted(trainer=None) -> bool:
    """After training returned: True if it stopped for a signal. Under Slurm, rank 0 also requeues the job."""
    if not _preempted:
        return False
    job_id = os.environ.get("SLURM_JOB_ID")
    main = trainer.is_world_process_zero() if trainer is not None else PartialState().is_main_process
    if job_id and main:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if done.returncode == 0:
            logger.warning("preempted: checkpoint saved, Slurm job %s requeued", job_id)
        else:  # e.g. submitted with --no-requeue: the checkpoint is still there for a manual resubmit
            logger.error("preempted: checkpoint saved, but `scontrol requeue %s` failed: %s", job_id,
                         done.stderr.strip())
    elif not job_id:
        logger.warning("preempted: checkpoint saved; rerun with --resume true to continue")
    return True


class PreemptionCallback(TrainerCallback):
    """Save a full checkpoint and stop at the end of the step during which SIGUSR1/SIGTERM arrived.

    Each rank's handler only records the signal; at every step end the ranks all-reduce (max) that flag, so
    ranks that did not receive it stop at the same step and join the same collective save. Also marks every
    finished checkpoint complete (see module docstring), so it must be added to every training run.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum  # act at the next step boundary, never inside a forward/backward or collective

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        global _preempted
        _preempted = False
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Past the last step a stop signal must stop the process again (a launcher's SIGTERM on shutdown).
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        global _preempted
        stop = self.received is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            if not _preempted:
                logger.warning("stop signal (%s) -> saving checkpoint at step %d and stopping",
                               signal.Signals(self.received).name if self.received else "on another rank",
                               state.global_step)
            _preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Every rank has written its part (optimizer shards, RNG state) once all of them are here.
        PartialState().wait_for_everyone()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
        return control
