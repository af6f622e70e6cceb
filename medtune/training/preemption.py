"""Preemptible training: stop at a step boundary with exactly one complete checkpoint, and time-based checkpoints.

Slurm warns a job before it ends it (`#SBATCH --signal=B:USR1@300` in slurm/train.sbatch; SIGTERM on preemption or
scancel). Every rank records the signal from process start (medtune.training.stop_signal); `PreemptionCallback` turns
it into "save and stop at the end of this step" on all ranks together, so the checkpoint holds everything the Trainer
needs
for an exact resume (adapter, optimizer, scheduler, RNG states, global step -> data position). The process then
exits with EXIT_PREEMPTED, and the batch script, which outlives every rank, requeues the job; the requeued job
resumes from the newest complete checkpoint (medtune.checkpoints).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from medtune.training import stop_signal
from medtune.checkpoints import checkpoint_dir, mark_complete, rotate, unmark

logger = logging.getLogger(__name__)

# Exit status of a training process that stopped for a signal after a complete checkpoint (or before its first
# step): "requeue me", as opposed to 1 for a failure. slurm/train.sbatch relies on this value.
EXIT_PREEMPTED = 3
# Set by slurm/train.sbatch: its batch shell requeues the job after srun returns, so rank 0 must not.
BATCH_REQUEUES = "MEDTUNE_BATCH_REQUEUES"


def agree(flags: list[bool], device) -> list[bool]:
    """Each flag, set if it is set on any rank: one all-reduce on every rank (none in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    tensor = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def stop_requested(device) -> bool:
    """Whether any rank has received a stop signal. A collective: call it on every rank at the same point."""
    return agree([stop_signal.received() is not None], device)[0]


def requeue_without_batch_shell(is_main: bool) -> None:
    """After a stop: rank 0 of a Slurm job whose batch script does not requeue it (not slurm/train.sbatch) does."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        logger.warning("stopped for a signal: checkpoint saved; rerun with --resume true to continue")
    elif os.environ.get(BATCH_REQUEUES):
        logger.warning("stopped for a signal: checkpoint saved; the batch script requeues job %s", job_id)
    elif is_main:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if done.returncode == 0:
            logger.warning("stopped for a signal: checkpoint saved, Slurm job %s requeued", job_id)
        else:  # e.g. submitted with --no-requeue: the checkpoint is still there for a manual resubmit
            logger.error("stopped for a signal: checkpoint saved, but `scontrol requeue %s` failed: %s", job_id,
                         done.stderr.strip())


class PreemptionCallback(TrainerCallback):
    """Stop for a signal and save on a timer, at step boundaries, on all ranks together; mark checkpoints complete.

    At every step end the ranks all-reduce two flags at once: "a stop signal arrived on some rank" and
    "save_every_minutes have passed since the last save on some rank", so ranks that did not receive the signal,
    or whose clock lags, stop or save at the same step and join the same collective save.

    After a stop nothing but that one save runs: transformers' DefaultFlowCallback asks for an evaluation (and,
    with save_strategy steps, a save) at the step end, and for both again at the epoch end that the stopped step
    leads to (`on_epoch_end`, with eval/save_strategy epoch); this callback, added after it, takes those back.

    It also owns the recipe's `save_total_limit` (the Trainer gets None: medtune.training.trainer_arguments): old
    checkpoints are deleted only after the new one is complete. Add it after every callback that writes into checkpoint
    folders (the marker must be the last file).
    """

    def __init__(self, save_every_minutes: float = 0, save_total_limit: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.save_every_minutes = save_every_minutes
        self.save_total_limit = save_total_limit
        self.clock = clock
        self.stopped = False
        self._last_save = 0.0
        self._saved_step: int | None = None
        self._save_started = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.stopped = False
        self._last_save = self.clock()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        due = self.save_every_minutes > 0 and self.clock() - self._last_save >= self.save_every_minutes * 60
        stop, due = agree([stop_signal.received() is not None, due], args.device)
        if stop:
            received = stop_signal.received()
            logger.warning("stop signal (%s) -> saving checkpoint at step %d and stopping, without evaluation",
                           received.name if received else "on another rank", state.global_step)
            self.stopped = True
            control.should_training_stop = True
            control.should_evaluate = False
        control.should_save = control.should_save or stop or due
        self._before_save(args, state, control)
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.stopped:
            control.should_evaluate = False
        if state.global_step == self._saved_step:  # this step's end saved already (a stop, a timed save)
            control.should_save = False
        self._before_save(args, state, control)
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._save_started = time.perf_counter()  # a save that follows an evaluation starts now

    def _before_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        if not control.should_save:
            return
        if state.is_world_process_zero:
            unmark(checkpoint_dir(args.output_dir, state.global_step))
        PartialState().wait_for_everyone()  # no rank writes into the folder while it still looks complete
        self._save_started = time.perf_counter()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Every rank has written its part (optimizer shards, RNG state) once all of them are here.
        PartialState().wait_for_everyone()
        folder = checkpoint_dir(args.output_dir, state.global_step)
        if state.is_world_process_zero and folder.is_dir():
            mark_complete(folder, state.global_step)
            rotate(args.output_dir, folder, self.save_total_limit)
        logger.info("%s complete, saved in %.1f s", folder.name, time.perf_counter() - self._save_started)
        self._saved_step = state.global_step
        self._last_save = self.clock()
        return control
