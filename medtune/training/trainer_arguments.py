"""The arguments the Trainer runs with: the recipe's `training` settings with medtune's adjustments, all made here.

`resolve_trainer_arguments` runs once, after data preparation (whether eval rows exist is known only then, and data
preparation reads no setting it adjusts) and before the model, W&B and the Trainer. It returns a copy: the recipe
stays as the user wrote it, so the run manifest (run_info.json) and the W&B config show the user's values, next to
the adjustments (`adjusted` in the manifest); each adjustment is also logged.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from transformers.trainer_utils import IntervalStrategy

if TYPE_CHECKING:
    from trl import SFTConfig

    from medtune.training.arguments import Recipe

logger = logging.getLogger(__name__)


@dataclass
class Adjustment:
    key: str
    recipe: Any  # the user's value
    used: Any  # the Trainer's
    reason: str


def resolve_trainer_arguments(recipe: Recipe, has_eval: bool) -> tuple[SFTConfig, list[Adjustment]]:
    """(the Trainer's arguments, the adjustments made to the recipe's `training` to get them)."""
    args = copy.copy(recipe.training)
    adjustments: list[Adjustment] = []

    def adjust(key: str, value, reason: str, level: int = logging.INFO) -> None:
        old = getattr(args, key)
        if old != value:
            setattr(args, key, value)
            old, new = (v.value if isinstance(v, Enum) else v for v in (old, value))  # "no", not IntervalStrategy.NO
            adjustments.append(Adjustment(key, old, new, reason))
            logger.log(level, "training argument %s: %r -> %r (%s)", key, old, new, reason)

    if not torch.cuda.is_available():
        for key in ("fp16", "bf16"):
            adjust(key, False, "no GPU: training in fp32", logging.WARNING)
    elif args.fp16 and torch.cuda.is_bf16_supported():
        for key, value in (("fp16", False), ("bf16", True)):
            adjust(key, value, "the GPU has bf16: same memory as fp16, no loss scaling")
    # Only global rank 0 logs (medtune.monitoring.logs): transformers' should_log singles it out with this setting,
    # rather than each node's local rank 0.
    adjust("log_on_each_node", False, "only global rank 0 logs")
    if args.process_index != 0:
        # With disable_tqdm the Trainer prints metrics through PrinterCallback, which prints on every node's local
        # rank 0 (measured: a 2-node run printed each metric line twice); ProgressCallback shows nothing off rank 0.
        adjust("disable_tqdm", False, "metrics print on global rank 0 only")
    # The data is already tokenized, masked and packed (medtune.data); TRL's padding-free collator turns each packed
    # row's seq_lengths into restarting position_ids.
    adjust("dataset_kwargs", {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True},
           "medtune.data tokenized, masked and packed the rows")
    adjust("padding_free", args.packing, "packed rows restart position_ids per sample")
    if not has_eval:
        adjust("eval_strategy", IntervalStrategy.NO, "no eval rows")
    # The Trainer's rotation deletes old checkpoints once rank 0 has written its part of the new one; medtune's
    # (medtune.training.preemption) does it after every rank has, so a job killed in between keeps a complete
    # checkpoint.
    adjust("save_total_limit", None, "medtune rotates checkpoints itself, once the new one is complete")
    if "wandb" in (args.report_to or []):
        adjust("report_to", [r for r in args.report_to if r != "wandb"],
               "medtune's W&B callback takes the place of the Trainer's (medtune.monitoring)")
        if recipe.monitoring.wandb_name and not args.run_name:
            adjust("run_name", recipe.monitoring.wandb_name, "wandb_name; WandbCallback names the run after it")
    return args, adjustments
