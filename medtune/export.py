"""Merge a trained LoRA adapter into its base model and write a standalone model folder.

    medtune-export --model adjusted_model --out exported/starling-medtuned    # or: medtune-export adjusted_model ...

The base is loaded in a float dtype (merging needs real weights): for an adapter trained on a 4-bit (or 8-bit) base,
the base's weights as training saw them, quantised as then and de-quantised (medtune.inference.load_base), so the
merged model answers as the adapter did in training; `--adapter-base original` merges into the original weights
instead. The adapter is merged with peft's `merge_and_unload`, and the folder gets safetensors shards, the tokenizer
with the chat template it was trained with, a generation_config whose eos_token_id lists every stop id of that
format, and a model card built from the run's manifest (run_info.json) and evaluation report (eval.json) when they
are there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import GenerationConfig

from medtune.adapters import adapter_base, is_adapter, run_manifest, trained_quantization
from medtune.chat_format import ChatFormat
from medtune.command_line import add_adapter_base_argument
from medtune.inference import load_tokenizer, load_weights

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DISCLAIMER = (
    "This model is for research and education. It is not a doctor and does not give medical diagnoses or "
    "treatment. Its answers can be wrong or incomplete; always consult a qualified health professional. "
    "In an emergency (chest pain, trouble breathing, signs of stroke, severe bleeding, thoughts of self-harm) "
    "call your local emergency number or seek care immediately."
)
METRIC_FILES = ("all_results.json", "eval_results.json", "train_results.json")
EVAL_REPORT = "eval.json"
RECIPE_KEYS = ("model_name_or_path", "load_in_4bit", "bnb_4bit_quant_type", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target_modules", "max_length", "packing", "completion_only_loss", "learning_rate",
               "lr_scheduler_type", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "gradient_accumulation_steps", "optim", "seed")


@dataclass
class TrainingRecord:
    """What the adapter folder (or the training output folder above it) says about how it was made."""

    run_info: dict  # medtune's run manifest (medtune.monitoring.run_info), {} without one
    metrics: dict  # the Trainer's final metrics
    eval_report: dict  # medtune-eval's eval.json, {} without one

    @property
    def data(self) -> str:
        return self.run_info.get("recipe", {}).get("data", {}).get("dataset_name") or "not recorded"

    @property
    def recipe_path(self) -> str | None:
        return self.run_info.get("recipe", {}).get("path")

    def recipe_settings(self) -> dict:
        sections = [v for k, v in self.run_info.get("recipe", {}).items() if isinstance(v, dict)]
        settings = {k: v for section in sections for k, v in section.items()}
        return {k: settings[k] for k in RECIPE_KEYS if k in settings}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def find_training_record(adapter_dir: Path) -> TrainingRecord:
    folders = [adapter_dir, adapter_dir.parent]
    run_info = run_manifest(adapter_dir)
    metrics: dict = {}
    for d in reversed(folders):  # files next to the adapter win
        for name in METRIC_FILES:
            metrics.update(_read_json(d / name))
        state = _read_json(d / "trainer_state.json")
        if state and not metrics:
            # the last logged evaluation, when no *_results.json was written
            evals = [e for e in state.get("log_history", []) if "eval_loss" in e]
            metrics.update(evals[-1] if evals else {})
    eval_report = next((r for d in folders if (r := _read_json(d / EVAL_REPORT))), {})
    return TrainingRecord(run_info, metrics, eval_report)


def _headlines(report: dict) -> list[dict]:
    """Each family's headline metric, tuned and base, from a medtune-eval report."""
    base = report.get("baseline", {}).get("families", {})
    rows = [{"name": f, "metric": m["primary"], "n": m["n"], "value": m[m["primary"]],
             "base": base.get(f, {}).get(m["primary"])} for f, m in report.get("families", {}).items()]
    if "loss" in report.get("overall", {}):
        rows.append({"name": "all", "metric": "reply loss", "n": report["overall"]["n"],
                     "value": report["overall"]["loss"],
                     "base": report.get("baseline", {}).get("overall", {}).get("loss")})
    return rows


# Rendered by huggingface_hub's ModelCard.from_template (jinja2): the metadata block comes from ModelCardData.
CARD_TEMPLATE = """---
{{ card_data }}
---

# Medical assistant fine-tuned from {{ base }} (merged LoRA)

Fine-tuned from `{{ base }}` with a LoRA adapter (medtune), merged into the base weights ({{ dtype }}){% if \
quantized %}: the weights LoRA was trained against, the base quantised as in training ({{ quantized }}) and \
de-quantised{% endif %}.

- **Base model:** `{{ base }}`
- **Training data:** `{{ data }}`{% if rows %} ({{ rows }}){% endif %}
- **Chat format:** the tokenizer's chat template, stored in this folder, as in training; generation stops at \
{{ stop_tokens }} (ids {{ stop_ids }}, generation_config.json).

## Medical disclaimer

{{ disclaimer }}
{% if recipe %}
## Training recipe

{% if recipe_path %}From `{{ recipe_path }}`:
{% endif %}
| setting | value |
| --- | --- |
{% for name, value in recipe.items() %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}{% if evaluation %}
## Evaluation

{{ eval_scope }}

| family | metric | n | base | fine-tuned |
| --- | --- | --- | --- | --- |
{% for r in evaluation %}| {{ r.name }} | {{ r.metric }} | {{ r.n }} | {{ r.base }} | {{ r.value }} |
{% endfor %}{% endif %}{% if metrics %}
## Training metrics

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


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else value


def model_card(base: str, record: TrainingRecord, dtype: str, fmt: ChatFormat,
               quantized: dict | None = None) -> ModelCard:
    data = record.data
    stats = record.run_info.get("data", {})
    rows = (f"{stats['rows_kept']} of {stats['rows_read']} training rows kept, {sum(stats['skipped'].values())} "
            f"skipped, {stats['tokens']} tokens" if stats else None)
    card_data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation",
        tags=["medical", "lora", "qlora", "medtune"],
        datasets=[data] if data.count("/") == 1 and not Path(data).exists() else None,  # hub ids only
    )
    report = record.eval_report
    evaluation = [{k: _fmt(v) for k, v in r.items()} for r in _headlines(report)]
    scope = f"medtune-eval on `{report.get('data')}` ({report.get('rows')} rows, greedy)" if report else ""
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, base=base, dtype=dtype, data=data, rows=rows, disclaimer=DISCLAIMER,
        stop_tokens=", ".join(f"`{t}`" for t in fmt.stop_tokens), stop_ids=list(fmt.stop_ids),
        quantized=quantization_name(quantized) if quantized else None, recipe_path=record.recipe_path,
        recipe=record.recipe_settings(), evaluation=evaluation, eval_scope=scope,
        metrics={k: _fmt(v) for k, v in record.metrics.items()},
    )


def quantization_name(settings: dict) -> str:
    if settings.get("load_in_8bit"):
        return "bitsandbytes 8-bit"
    nested = " with double quantization" if settings.get("use_bnb_nested_quant") else ""
    return f"bitsandbytes 4-bit {settings.get('bnb_4bit_quant_type', 'nf4').upper()}{nested}"


def export(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
           dtype: str = "bfloat16", max_shard_size: str = "5GB", as_trained: bool = True) -> Path:
    """Merge `adapter_dir` into its base and write the standalone model to `out_dir`."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not is_adapter(adapter_dir):
        raise ValueError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter folder")
    base = base_model or adapter_base(adapter_dir)
    quantized = trained_quantization(adapter_dir) if as_trained else None
    model = load_weights(adapter_dir, DTYPES[dtype], base_model, as_trained)  # float weights, on CPU
    fmt = ChatFormat(load_tokenizer(adapter_dir, fallback=base), eos_token_id=model.generation_config.eos_token_id)
    merged = model.merge_and_unload()
    stop = list(fmt.stop_ids)
    merged.generation_config = GenerationConfig(bos_token_id=fmt.tokenizer.bos_token_id,
                                                eos_token_id=stop[0] if len(stop) == 1 else stop,
                                                pad_token_id=fmt.tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    fmt.tokenizer.save_pretrained(out)
    model_card(base, find_training_record(adapter_dir), dtype, fmt, quantized).save(out / "README.md")
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
    add_adapter_base_argument(parser)
    args = parser.parse_args(argv)
    if args.model and args.adapter and args.model != args.adapter:
        parser.error(f"two adapters given ({args.adapter} and --model {args.model}): give one")
    args.model = args.model or args.adapter
    if not args.model:
        parser.error("the adapter folder is required: --model ADAPTER_DIR")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = export(args.model, args.out, args.base, args.dtype, args.max_shard_size, args.adapter_base == "as-trained")
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
