"""`ThroughputCallback`: tokens/s, MFU, memory, packing and ETA added to every training log, over all ranks."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from medtune.monitoring.flops import FlopModel, batch_counts, peak_flops

logger = logging.getLogger(__name__)


def memory_bytes() -> tuple[int, int]:
    """(current, peak) memory: CUDA allocated bytes when on a GPU, else this process's resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


class ThroughputCallback(TrainerCallback):
    """Adds throughput, MFU, memory, packing and ETA metrics to every training log, summed over all ranks.

    A forward pre-hook counts the real tokens and samples of each training micro-batch on the device (no sync);
    at each training log every rank contributes its counters to one gather. Time is the optimizer-step time
    (on_step_begin -> on_step_end) so evaluation and checkpoint saving do not dilute tokens/s.
    Keys (W&B shows them as train/<key>): tokens_per_second, tokens_per_second_per_device, samples_per_second,
    mfu (when the device peak is known), step_time, packing_efficiency, memory_gb, memory_peak_gb (max over
    ranks), progress (fraction of max_steps), eta_seconds.
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self._hook = None
        self._counts: torch.Tensor | None = None  # tokens, samples, sum s^2, micro-batches
        self._step_seconds = 0.0
        self._train_seconds = 0.0
        self._session_steps = 0
        self._step_started = 0.0

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from accelerate import PartialState

        dist = PartialState()
        self._device, self._world = dist.device, dist.num_processes
        pad_id = getattr(processing_class, "pad_token_id", None)
        self._slots_per_batch = args.per_device_train_batch_size * (getattr(args, "max_length", None) or 0)
        try:
            self._flops = FlopModel.from_model(model)
        except (AttributeError, TypeError) as err:  # a wrapper without config/embeddings: no FLOP count
            logger.warning("MFU not logged: cannot count the model's parameters (%s)", err)
            self._flops = None
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        self._peak = peak_flops(name if torch.cuda.is_available() else None, self.peak_tflops)
        if self._peak is None:
            logger.info("MFU not logged: unknown peak FLOP/s for %s (set peak_tflops to enable it)", name)
        self._start_step = state.global_step

        def count(module, args_, kwargs_):
            if not (module.training and torch.is_grad_enabled()):  # skip eval and metrics-only forwards
                return
            ids = kwargs_.get("input_ids", args_[0] if args_ else None)
            if ids is None:
                return
            counts = batch_counts(ids, kwargs_.get("attention_mask"), kwargs_.get("position_ids"), pad_id)
            slots = self._slots_per_batch or ids.numel()
            counts = torch.cat([counts, counts.new_tensor([slots])])
            self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

        self._hook = model.register_forward_pre_hook(count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._step_started
        self._step_seconds += elapsed
        self._train_seconds += elapsed
        self._session_steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only training logs carry "loss"; every rank sees the same keys, so all ranks enter the gather together.
        if logs is None or "loss" not in logs or self._hook is None:
            return
        from accelerate.utils import gather

        counts = self._counts if self._counts is not None else torch.zeros(4, dtype=torch.float64)
        current, peak = memory_bytes()
        local = torch.cat([counts.to(self._device), torch.tensor([self._step_seconds, current, peak],
                                                                  dtype=torch.float64, device=self._device)])
        rows = gather(local[None]).cpu()
        tokens, samples, squares, slots = rows[:, :4].sum(0).tolist()
        seconds, current, peak = rows[:, 4:].max(0).values.tolist()
        steps = max(state.global_step - getattr(self, "_logged_step", self._start_step), 1)
        self._logged_step, self._counts, self._step_seconds = state.global_step, None, 0.0
        metrics = {"step_time": seconds / steps, "memory_gb": current / 2**30, "memory_peak_gb": peak / 2**30}
        if seconds > 0:
            metrics.update(tokens_per_second=tokens / seconds, samples_per_second=samples / seconds,
                           tokens_per_second_per_device=tokens / seconds / self._world)
            if self._peak and self._flops:
                metrics["mfu"] = self._flops.batch(tokens, squares) / (seconds * self._world * self._peak)
        if slots:
            metrics["packing_efficiency"] = tokens / slots
        if state.max_steps > 0:
            metrics["progress"] = state.global_step / state.max_steps
            per_step = self._train_seconds / max(self._session_steps, 1)
            metrics["eta_seconds"] = (state.max_steps - state.global_step) * per_step
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # Trainer.log stored a copy of logs before the callbacks ran

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
