"""LoRA adapter folders as peft writes them: recognising one and reading its adapter_config.json.

Standard library only, so that commands that merely inspect an adapter (`medtune-serve --print-vllm-command`)
start without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_config(path: str | Path) -> dict:
    """peft's adapter_config.json of an adapter folder."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())


def adapter_base(path: str | Path) -> str:
    """The base model recorded by peft in adapter_config.json."""
    return adapter_config(path)["base_model_name_or_path"]
