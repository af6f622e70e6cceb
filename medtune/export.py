"""Merge a trained LoRA adapter into its base model and write a standalone model folder.

    medtune-export --model adjusted_model --out exported/starling-medtuned    # or: medtune-export adjusted_model ...

The base is loaded un-quantised (training may have used a 4-bit base; merging needs real weights), the
adapter is merged with peft's `merge_and_unload`, and the folder gets safetensors shards, the tokenizer (with
the Starling chat template), a generation_config that stops at `<|end_of_turn|>`, and a model card.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoModelForCausalLM, GenerationConfig

from medtune.chat_format import END_OF_TURN
from medtune.adapters import adapter_base, is_adapter
from medtune.inference import load_inference_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DISCLAIMER = (
    "This model is for research and education. It is not a doctor and does not give medical diagnoses or "
    "treatment. Its answers can be wrong or incomplete; always consult a qualified health professional. "
    "In an emergency (chest pain, trouble breathing, signs of stroke, severe bleeding, thoughts of self-harm) "
    "call your local emergency number or seek care immediately."
)
METRIC_FILES = ("all_results.json", "eval_results.json", "train_results.json")


@dataclass
class TrainingRecord:
    """What the adapter folder (or the training output folder above it) says about how it was made."""

    recipe_file: Path | None
    recipe: dict
    metrics: dict


def find_training_record(adapter_dir: Path) -> TrainingRecord:
    folders = [adapter_dir, adapter_dir.parent]
    recipe_file = next((f for d in folders for f in sorted(d.glob("*.yaml"))), None)
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file else {}
    metrics: dict = {}
    for d in reversed(folders):  # files next to the adapter win
        for name in METRIC_FILES:
            if (d / name).is_file():
                metrics.update(json.loads((d / name).read_text()))
        state = d / "trainer_state.json"
        if state.is_file() and not metrics:
            # the last logged evaluation, when no *_results.json was written
            evals = [e for e in json.loads(state.read_text()).get("log_history", []) if "eval_loss" in e]
            metrics.update(evals[-1] if evals else {})
    return TrainingRecord(recipe_file, recipe if isinstance(recipe, dict) else {}, metrics)


# Rendered by huggingface_hub's ModelCard.from_template (jinja2): the metadata block comes from ModelCardData.
CARD_TEMPLATE = """---
{{ card_data }}
---

# Starling-LM medical assistant (merged LoRA)

Fine-tuned from `{{ base }}` with a LoRA adapter (medtune), merged into the base weights ({{ dtype }}).

- **Base model:** `{{ base }}`
- **Training data:** `{{ data }}`
- **Chat format:** `GPT4 Correct User: {message}<|end_of_turn|>GPT4 Correct Assistant:` (stored as the tokenizer's \
chat template); generation stops at `<|end_of_turn|>` (id 32000).

## Medical disclaimer

{{ disclaimer }}
{% if recipe_text %}
## Training recipe

`{{ recipe_name }}`:

```yaml
{{ recipe_text }}
```
{% endif %}{% if metrics %}
## Metrics

| metric | value |
| --- | --- |
{% for name, value in metrics.items() %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## Usage

```bash
medtune-chat --model <this folder>
medtune-serve --model <this folder>   # OpenAI-compatible API and web chat on 127.0.0.1:8000
```
"""


def model_card(base: str, record: TrainingRecord, dtype: str) -> ModelCard:
    data = record.recipe.get("dataset_name", "not recorded")
    card_data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation",
        tags=["medical", "starling", "lora", "qlora", "medtune"],
        datasets=[data] if data.count("/") == 1 and not Path(data).exists() else None,  # hub ids only
    )
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, base=base, dtype=dtype, data=data, disclaimer=DISCLAIMER,
        recipe_name=record.recipe_file.name if record.recipe_file else None,
        recipe_text=record.recipe_file.read_text().strip() if record.recipe_file else None,
        metrics={k: f"{v:.4g}" if isinstance(v, float) else v for k, v in record.metrics.items()},
    )


def export(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
           dtype: str = "bfloat16", max_shard_size: str = "5GB") -> Path:
    """Merge `adapter_dir` into its base and write the standalone model to `out_dir`."""
    from peft import PeftModel

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not is_adapter(adapter_dir):
        raise ValueError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter folder")
    base = base_model or adapter_base(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])  # un-quantised, on CPU
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tok = load_inference_tokenizer(adapter_dir, fallback=base)

    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    merged.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eot, pad_token_id=tok.pad_token_id
    )
    merged.config.eos_token_id, merged.config.pad_token_id = eot, tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)
    model_card(base, find_training_record(adapter_dir), dtype).save(out / "README.md")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medtune-export",
                                     description="Merge a LoRA adapter into its base model and export it.")
    parser.add_argument("--model", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("adapter", nargs="?", help="the adapter folder as a positional argument (same as --model)")
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.add_argument("--base", help="base model path or hub id (default: the one in adapter_config.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype the merged weights are written in (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.model and args.adapter and args.model != args.adapter:
        parser.error(f"two adapters given ({args.adapter} and --model {args.model}): give one")
    args.model = args.model or args.adapter
    if not args.model:
        parser.error("the adapter folder is required: --model ADAPTER_DIR")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = export(args.model, args.out, args.base, args.dtype, args.max_shard_size)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
