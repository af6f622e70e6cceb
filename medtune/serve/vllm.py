"""`medtune-serve --print-vllm-command`: the exact `vllm serve` command for an exported model or a LoRA adapter.

Flags as vLLM's CLI defines them (vllm-project/vllm: vllm/entrypoints/openai/cli_args.py, vllm/config/lora.py,
vllm/config/model.py; docs/SERVING.md cites them). Nothing that changes how vLLM renders a prompt: it renders with
the chat template of the tokenizer folder it is given, which is the one medtune trained with (saved with the adapter
and by medtune-export), so no `--chat-template`.
- a merged model: `--served-model-name`, and `--generation-config <folder>`, whose generation_config.json (written by
  medtune-export) lists every stop id of the chat format as eos_token_id;
- an adapter: the base model from adapter_config.json, `--enable-lora --lora-modules name=path`, `--max-lora-rank`
  (one of vLLM's allowed ranks, at least the adapter's r), `--tokenizer <adapter folder>` (the tokenizer saved with
  the adapter) and `--generation-config <adapter folder>` (the stop ids training wrote there);
- no key on the command line: vLLM reads VLLM_API_KEY from its environment, as it would `--api-key`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from medtune.adapters import ADAPTER_CONFIG, adapter_config, is_adapter, trained_quantization

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # MaxLoRARanks in vllm/config/lora.py
GENERATION_CONFIG = "generation_config.json"


def vllm_args(model: str | Path, name: str | None = None, max_model_len: int | None = None,
              port: int = 8000) -> list[str]:
    path = Path(model).resolve()
    name = name or path.name
    if is_adapter(path):
        config = adapter_config(path)
        rank = int(config["r"])
        max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
        if max_rank is None:
            raise ValueError(f"{path / ADAPTER_CONFIG}: LoRA rank r={rank} is above vLLM's largest, "
                             f"{VLLM_LORA_RANKS[-1]}")
        lora = f"{name}={path}" if not set(",=") & set(str(path)) else json.dumps({"name": name, "path": str(path)})
        args = ["vllm", "serve", config["base_model_name_or_path"], "--enable-lora", "--lora-modules", lora,
                "--max-lora-rank", str(max_rank), "--tokenizer", str(path)]
    else:
        args = ["vllm", "serve", str(path), "--served-model-name", name]
    if (path / GENERATION_CONFIG).is_file():
        args += ["--generation-config", str(path)]
    args += ["--port", str(port)]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    return args


def vllm_instructions(model: str | Path, name: str | None = None, max_model_len: int | None = None,
                      port: int = 8000) -> str:
    """The vLLM command and the medtune-serve command that puts the page, triage and keys in front of it."""
    name = name or Path(model).resolve().name
    quantized = is_adapter(model) and trained_quantization(model)
    return "\n".join([
        *(["# This adapter was trained on a quantised base; vLLM adds it to the original weights. To serve the model",
           "# as trained, export it (medtune-export merges it into the base's weights as training saw them) and serve",
           "# that folder."] if quantized else []),
        "# On the GPU machine (vLLM reads its API key from VLLM_API_KEY; bind it to a network only medtune can reach):",
        "export VLLM_API_KEY=<a long random key>",
        shlex.join(vllm_args(model, name, max_model_len, port)),
        "# In front of it, the page, the emergency triage and your users' keys:",
        f"MEDTUNE_UPSTREAM_API_KEY=$VLLM_API_KEY medtune-serve --upstream http://<gpu-machine>:{port}/v1 "
        f"--upstream-model {shlex.quote(name)}",
    ])
