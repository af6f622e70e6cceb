"""The run manifest: recipe, library versions, commit, hardware and data counts of a training run."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from medtune.adapters import RUN_INFO_FILE
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets", "wandb")


def run_info(recipe, prepared, adjustments=()) -> dict:
    """Everything needed to reproduce or compare a run: the recipe as the user wrote it, the adjustments the Trainer's
    arguments got (medtune.training.trainer_arguments), versions, commit, hardware and data counts."""
    from accelerate import PartialState

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
        commit = git.stdout.strip() if git.returncode == 0 else None  # None outside a repo or before a commit
    except (OSError, subprocess.SubprocessError):
        commit = None
    world = PartialState().num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    stats = prepared.stats.as_dict() if prepared is not None else {}
    return {
        "recipe": {"path": recipe.path, **{f.name: _as_dict(getattr(recipe, f.name))
                                            for f in dataclasses.fields(recipe) if f.name != "path"}},
        "adjusted": {a.key: {"recipe": a.recipe, "used": a.used, "reason": a.reason} for a in adjustments},
        "versions": {"python": platform.python_version(), **versions},
        "git_commit": commit,
        "hardware": {"gpus": gpus, "gpus_per_node": len(gpus), "world_size": world,
                     "nodes": max(world // max(local, 1), 1), "host": platform.node()},
        "data": stats,
    }


def _as_dict(section) -> dict:
    # TrainingArguments' own to_dict writes enums as their values and hides tokens.
    return section.to_dict() if hasattr(section, "to_dict") else dataclasses.asdict(section)


def write_run_info(output_dir: str | os.PathLike, info: dict) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
