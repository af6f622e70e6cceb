"""`medtune-serve --print-vllm-command`: the exact `vllm serve` command for an exported model or a LoRA adapter.

Flags as vLLM's CLI defines them (vllm-project/vllm: vllm/entrypoints/openai/cli_args.py, vllm/config/lora.py,
vllm/config/model.py; docs/SERVING.md cites them):
- `--chat-template` takes "the file path to the chat template, or the template in single-line form": medtune's
  Starling template is one line, so the served prompt is exactly the training format whatever the tokenizer folder
  holds;
- a merged model: `--served-model-name`, and `--generation-config <folder>`, whose generation_config.json (written by
  medtune-export) stops at <|end_of_turn|>;
- an adapter: the base model from adapter_config.json, `--enable-lora --lora-modules name=path`, `--max-lora-rank`
  (one of vLLM's allowed ranks, at least the adapter's r), and `--tokenizer <adapter folder>`, the Starling tokenizer
  saved with the adapter, whose eos token is <|end_of_turn|> (vLLM always stops at the tokenizer's eos);
- no key on the command line: vLLM reads VLLM_API_KEY from its environment, as it would `--api-key`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from medtune.chat_format import CHAT_TEMPLATE
from medtune.adapters import ADAPTER_CONFIG, adapter_config, is_adapter

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # MaxLoRARanks in vllm/config/lora.py


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
        args = ["vllm", "serve", str(path), "--served-model-name", name, "--generation-config", str(path)]
    args += ["--chat-template", CHAT_TEMPLATE, "--port", str(port)]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    return args


def _quote(arg: str) -> str:
    """shlex.quote, but double quotes around text with single quotes (the chat template) when that is safe: the
    template then reads as it is."""
    return f'"{arg}"' if "'" in arg and not set('"$`\\!') & set(arg) else shlex.quote(arg)


def vllm_instructions(model: str | Path, name: str | None = None, max_model_len: int | None = None,
                      port: int = 8000) -> str:
    """The vLLM command and the medtune-serve command that puts the page, triage and keys in front of it."""
    name = name or Path(model).resolve().name
    return "\n".join([
        "# On the GPU machine (vLLM reads its API key from VLLM_API_KEY; bind it to a network only medtune can reach):",
        "export VLLM_API_KEY=<a long random key>",
        " ".join(map(_quote, vllm_args(model, name, max_model_len, port))),
        "# In front of it, the page, the emergency triage and your users' keys:",
        f"MEDTUNE_UPSTREAM_API_KEY=$VLLM_API_KEY medtune-serve --upstream http://<gpu-machine>:{port}/v1 "
        f"--upstream-model {shlex.quote(name)}",
    ])
