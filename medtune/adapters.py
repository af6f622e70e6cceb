"""LoRA adapter folders as peft writes them: recognising one, reading its adapter_config.json, and the run manifest
(run_info.json) medtune writes next to it.

Standard library only, so that commands that merely inspect an adapter (`medtune-serve --print-vllm-command`)
start without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
RUN_INFO_FILE = "run_info.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_config(path: str | Path) -> dict:
    """peft's adapter_config.json of an adapter folder."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())


def adapter_base(path: str | Path) -> str:
    """The base model recorded by peft in adapter_config.json."""
    return adapter_config(path)["base_model_name_or_path"]


def run_manifest(path: str | Path) -> dict:
    """The run manifest of the training run that wrote an adapter folder: the folder's own run_info.json or, for a
    checkpoint-N folder, the run's above it; {} for an adapter trained elsewhere."""
    for folder in (Path(path), Path(path).parent):
        if (folder / RUN_INFO_FILE).is_file():
            return json.loads((folder / RUN_INFO_FILE).read_text())
    return {}


def trained_quantization(path: str | Path) -> dict | None:
    """The model settings (TRL ModelConfig's fields) of the run that trained the adapter when it trained on a 4-bit or
    8-bit base, else None (an un-quantised base, or no manifest)."""
    model = run_manifest(path).get("recipe", {}).get("model", {})
    return model if model.get("load_in_4bit") or model.get("load_in_8bit") else None
