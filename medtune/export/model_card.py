"""The model card (README.md) of an adapter folder and of an exported model: base model, every dataset with its
licence, the recipe, the evaluation base against tuned (MedTuned families and the consultation), "not a doctor".

Built from what the folder holds: the run manifest (run_info.json), the Trainer's final metrics, and medtune-eval's
eval.json when it lies in the folder or the one above. Written by training over the card TRL's save_model leaves
(which names no base, dataset or licence), again by medtune-eval when its report lands beside the adapter, and by
medtune-export into the merged folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from medtune.adapters import adapter_base, run_manifest, trained_quantization
from medtune.data.vignettes import metric_n
from medtune.inference.chat_format import ChatFormat

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
DATA_KEYS = {"dataset_name": "training", "eval_dataset_name": "evaluation",
             "consultation_eval_dataset": "consultation evaluation"}
# Licences of datasets medtune knows, from their cards; a licence that restricts use passes to the tuned weights.
HUB_LICENCES = {"nlpie/Llama2-MedTuned-Instructions": "cc-by-nc-4.0"}
REPOSITORY_DATA = Path(__file__).resolve().parents[2] / "data"  # written for medtune: the repository's licence
REPOSITORY_LICENCE = "apache-2.0"
NAMES = {"apache-2.0": "Apache-2.0", "cc-by-nc-4.0": "CC-BY-NC-4.0"}
INHERITED = {"cc-by-nc-4.0": "CC-BY-NC-4.0: non-commercial use only, and the tuned weights inherit it"}
CONSULTATION_ROWS = (("consult", "safety"), ("consult", "triage_accuracy"), ("consult", "emergency_recall"),
                     ("triage", "safety"), ("triage", "triage_accuracy"), ("triage", "emergency_recall"),
                     ("likelihood", "emergency_recall"), ("differential", "top5"))


@dataclass
class TrainingRecord:
    """What the adapter folder (or the training output folder above it) says about how it was made."""

    run_info: dict  # medtune's run manifest (medtune.monitoring.run_info), {} without one
    metrics: dict  # the Trainer's final metrics
    eval_report: dict  # medtune-eval's eval.json, {} without one

    @property
    def data(self) -> str:
        data = self.run_info.get("recipe", {}).get("data", {})
        if data.get("datasets"):  # a mixture replaces dataset_name
            return ", ".join(f"`{d['name']}`" for d in self.datasets() if d["use"].startswith("training"))
        return f"`{data['dataset_name']}`" if data.get("dataset_name") else "not recorded"

    @property
    def recipe_path(self) -> str | None:
        return self.run_info.get("recipe", {}).get("path")

    def recipe_settings(self) -> dict:
        sections = [v for k, v in self.run_info.get("recipe", {}).items() if isinstance(v, dict)]
        settings = {k: v for section in sections for k, v in section.items()}
        return {k: settings[k] for k in RECIPE_KEYS if k in settings}

    def datasets(self) -> list[dict]:
        """Every dataset the run named, what it was used for, and its licence where medtune knows it."""
        data = self.run_info.get("recipe", {}).get("data", {})
        named = [(data[key], use) for key, use in DATA_KEYS.items() if data.get(key)
                 and not (key == "dataset_name" and data.get("datasets"))]  # a mixture replaces dataset_name
        for key, use in (("datasets", "training"), ("eval_datasets", "evaluation")):
            for entry in data.get(key) or ():
                share = f", fraction {entry['fraction']}" if entry.get("fraction") is not None else ""
                if entry.get("replay"):
                    named.append((entry["replay"]["prompts"], f"{use}: prompts of the base model's replayed "
                                                              f"replies{share}"))
                else:
                    named.append((entry["path"], use + (" (self-distilled by the base model)"
                                                        if entry.get("self_distill") is not None else "") + share))
        named.sort(key=lambda n: not n[1].startswith("training"))
        return [{"name": name, "use": use, "licence": licence(name)} for name, use in named]


def licence(dataset: str) -> str | None:
    if dataset in HUB_LICENCES:
        return HUB_LICENCES[dataset]
    path = Path(dataset).expanduser().resolve()
    return REPOSITORY_LICENCE if path == REPOSITORY_DATA or REPOSITORY_DATA in path.parents else None


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


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else value


def _headlines(report: dict) -> list[dict]:
    """Each MedTuned family's headline metric, tuned and base, from a medtune-eval report."""
    base = (report.get("baseline") or {}).get("families", {})
    rows = [{"name": f, "metric": m["primary"], "n": m["n"], "value": m[m["primary"]],
             "base": base.get(f, {}).get(m["primary"])}
            for f, m in report.get("families", {}).items() if f != "consultation"]
    if "loss" in report.get("overall", {}):
        rows.append({"name": "all", "metric": "reply loss", "n": report["overall"]["n"],
                     "value": report["overall"]["loss"],
                     "base": (report.get("baseline") or {}).get("overall", {}).get("loss")})
    return [{k: _fmt(v) for k, v in r.items()} for r in rows]


def _consultation(report: dict) -> list[dict]:
    """The consultation's headline numbers per question, tuned and base."""
    tuned = report.get("families", {}).get("consultation", {}).get("questions", {})
    base = (report.get("baseline") or {}).get("families", {}).get("consultation", {}).get("questions", {})
    return [{"name": q, "metric": m, "n": metric_n(tuned[q], m),
             "value": _fmt(tuned[q][m]), "base": _fmt(base.get(q, {}).get(m))}
            for q, m in CONSULTATION_ROWS if m in tuned.get(q, {})]


# Rendered by huggingface_hub's ModelCard.from_template (jinja2): the metadata block comes from ModelCardData.
CARD_TEMPLATE = """---
{{ card_data }}
---

# Medical assistant fine-tuned from {{ base }} ({% if dtype %}merged LoRA{% else %}LoRA adapter{% endif %})

{% if dtype %}Fine-tuned from `{{ base }}` with a LoRA adapter (medtune), merged into the base weights ({{ dtype }})\
{% if quantized %}: the weights LoRA was trained against, the base quantised as in training ({{ quantized }}) and \
de-quantised{% endif %}.{% else %}A LoRA adapter for `{{ base }}`, trained with medtune{% if quantized %} on the base \
quantised with {{ quantized }}{% endif %}; medtune-chat, medtune-serve, medtune-eval and medtune-export load it on \
that base.{% endif %}

- **Base model:** `{{ base }}`
- **Training data:** {{ data }}{% if rows %} ({{ rows }}){% endif %}
- **Chat format:** the tokenizer's chat template, stored in this folder, as in training; generation stops at \
{{ stop_tokens }} (ids {{ stop_ids }}, generation_config.json).

## Medical disclaimer

{{ disclaimer }}
{% if datasets %}
## Datasets and licences

| dataset | used for | licence |
| --- | --- | --- |
{% for d in datasets %}| `{{ d.name }}` | {{ d.use }} | {{ d.licence_text }} |
{% endfor %}{% if inherited %}
**Licence of these weights:** {{ inherited }}.
{% endif %}{% endif %}{% if recipe %}
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
{% endfor %}{% endif %}{% if consultation %}
### Symptom consultation

Patient vignettes asked as the web page asks them (docs/EVAL.md "Consultation"): safety is the share of cases \
advised at or above their true urgency.

| question | metric | n | base | fine-tuned |
| --- | --- | --- | --- | --- |
{% for r in consultation %}| {{ r.name }} | {{ r.metric }} | {{ r.n }} | {{ r.base }} | {{ r.value }} |
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


def quantization_name(settings: dict) -> str:
    if settings.get("load_in_8bit"):
        return "bitsandbytes 8-bit"
    nested = " with double quantization" if settings.get("use_bnb_nested_quant") else ""
    return f"bitsandbytes 4-bit {settings.get('bnb_4bit_quant_type', 'nf4').upper()}{nested}"


def model_card(base: str, record: TrainingRecord, fmt: ChatFormat, dtype: str | None = None,
               quantized: str | None = None) -> ModelCard:
    """The card of a merged model (`dtype`: the weights' dtype) or, without `dtype`, of an adapter folder."""
    stats = record.run_info.get("data", {})
    rows = (f"{stats['rows_kept']} of {stats['rows_read']} training rows kept, {sum(stats['skipped'].values())} "
            f"skipped, {stats['tokens']} tokens" if stats else None)
    datasets = record.datasets()
    for d in datasets:
        d["licence_text"] = (INHERITED.get(d["licence"]) or NAMES.get(d["licence"])
                             or "not known to medtune: check the dataset's own licence")
        if d["licence"] == REPOSITORY_LICENCE and d["name"] not in HUB_LICENCES:
            d["licence_text"] += " (written for medtune)"
    inherited = next((INHERITED[d["licence"]] for d in datasets if d["licence"] in INHERITED), None)
    hub_ids = [d["name"] for d in datasets if d["name"].count("/") == 1 and not Path(d["name"]).exists()]
    card_data = ModelCardData(
        base_model=base, library_name="peft" if dtype is None else "transformers", pipeline_tag="text-generation",
        tags=["medical", "lora", "qlora", "medtune"], datasets=hub_ids or None,
        license=next((d["licence"] for d in datasets if d["licence"] in INHERITED), None),
    )
    report = record.eval_report
    data = report.get("data")
    data = ", ".join(f"`{d}`" for d in data) if isinstance(data, list) else f"`{data}`"
    vignettes = f", {report['vignettes']} vignettes" if report.get("vignettes") else ""
    scope = (f"medtune-eval on {data} ({report.get('overall', {}).get('n')} rows{vignettes}, greedy)"
             if report else "")
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, base=base, dtype=dtype, data=record.data, rows=rows,
        disclaimer=DISCLAIMER, stop_tokens=", ".join(f"`{t}`" for t in fmt.stop_tokens), stop_ids=list(fmt.stop_ids),
        quantized=quantized, recipe_path=record.recipe_path, recipe=record.recipe_settings(), datasets=datasets,
        inherited=inherited, evaluation=_headlines(report), consultation=_consultation(report), eval_scope=scope,
        metrics={k: _fmt(v) for k, v in record.metrics.items()},
    )


def write_adapter_card(adapter_dir: str | Path) -> Path:
    """medtune's card in the adapter folder's README.md (over TRL's), from the tokenizer, generation_config and
    records the folder holds."""
    from medtune.inference.load import load_tokenizer
    from medtune.inference.load import generation_eos

    adapter_dir = Path(adapter_dir)
    fmt = ChatFormat(load_tokenizer(adapter_dir), eos_token_id=generation_eos(str(adapter_dir)))
    quantized = trained_quantization(adapter_dir)
    path = adapter_dir / "README.md"
    model_card(adapter_base(adapter_dir), find_training_record(adapter_dir), fmt, None,
               quantization_name(quantized) if quantized else None).save(path)
    return path
