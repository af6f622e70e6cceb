"""Typed recipe configuration: a YAML recipe plus `--key value` overrides, validated before anything heavy runs.

Parsing is TRL's `TrlParser` (the same flat YAML recipes as TRL scripts and alignment-handbook) over three
dataclasses: our `DataArguments` and `MonitoringArguments`, TRL's `ModelConfig` (model, 4-bit and LoRA keys) and
TRL's `SFTConfig` (TrainingArguments + SFT keys). `validate` then checks types, files and combinations, so a bad
recipe fails in a second with one message naming the key and the fix, not after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig, TrlParser

STARLING = "berkeley-nest/Starling-LM-7B-alpha"
MEDTUNED = "nlpie/Llama2-MedTuned-Instructions"
# Every linear projection of a Mistral block, as the reference recipe targets.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Older TRL recipes (and the reference recipe) say max_seq_length; TRL now calls it max_length.
KEY_ALIASES = {"max_seq_length": "max_length"}
# The longest fixed part of the chat template (BOS, role prefixes, two end-of-turn ids) in Starling tokens.
TEMPLATE_TOKENS = 20


class ConfigError(ValueError):
    """A recipe problem, reported before any model or data is loaded."""


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=MEDTUNED,
        metadata={"help": "Hub dataset id, or a local .jsonl/.json/.parquet/.csv file or a folder of them."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Split used for evaluation; 'none' disables it. If the dataset lacks it, "
                  "eval_split_size of the train split is held out instead."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate file/folder/hub id for evaluation (its train split is used)."}
    )
    eval_split_size: float = field(
        default=0.01, metadata={"help": "Fraction of train held out when no eval split exists (0 disables)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    overlong: str = field(
        default="truncate",
        metadata={"help": "Rows longer than max_length: 'truncate' (the input's end, then the reply's end) or "
                  "'drop' the row (both counted).",
                  "choices": ["truncate", "drop"]},
    )
    data_cache_dir: str = field(
        default=".cache/medtune/data", metadata={"help": "Where tokenized + packed datasets are cached."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Resume from the newest complete checkpoint in output_dir, if any."}
    )
    save_every_minutes: float = field(
        default=0,
        metadata={"help": "Also save a checkpoint at the first step end once this many minutes have passed since "
                  "the last save (a crash then loses at most that much training); 0 turns it off."},
    )
    generation_eval_samples: int = field(
        default=0,
        metadata={"help": "After training, generate and score this many eval rows per task family mix "
                  "(medtune.eval); 0 turns it off."},
    )
    sample_prompt: str = field(
        default="I have had a fever, a dry cough and a sore throat for three days. What could it be?",
        metadata={"help": "Question answered by the trained model at the end of training ('' to skip)."},
    )


@dataclass
class MonitoringArguments:
    """Weights & Biases and throughput settings (see medtune/monitoring.py)."""

    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project; default $WANDB_PROJECT, else 'medtune'."}
    )
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B team or user; default $WANDB_ENTITY."})
    wandb_group: str | None = field(
        default=None, metadata={"help": "W&B run group (e.g. a sweep or experiment name); default $WANDB_RUN_GROUP."}
    )
    wandb_tags: str | None = field(
        default=None, metadata={"help": "Comma-separated W&B tags, e.g. 'qlora,starling'; default $WANDB_TAGS."}
    )
    wandb_name: str | None = field(
        default=None, metadata={"help": "W&B run name; default run_name, else $WANDB_NAME, else a random name."}
    )
    wandb_dir: str | None = field(
        default=None, metadata={"help": "Folder for W&B files (offline runs land in <dir>/wandb); "
                                "default $WANDB_DIR, else output_dir."}
    )
    log_adapter_artifact: bool = field(
        default=True, metadata={"help": "Upload the trained LoRA adapter as a W&B 'model' artifact at the end."}
    )
    peak_tflops: float | None = field(
        default=None, metadata={"help": "Peak dense bf16/fp16 TFLOPS of one device, for MFU. Default: looked up "
                                "from the GPU name; MFU is not logged when unknown (e.g. on CPU)."}
    )


@dataclass
class Recipe:
    data: DataArguments
    model: ModelConfig
    training: SFTConfig
    monitoring: MonitoringArguments
    path: str | None = None


class _Parser(TrlParser):
    def error(self, message: str):  # argparse would print the whole usage and exit; one line is clearer
        raise ConfigError(f"{message} (see README.md 'Configuration reference')")


def _parser() -> TrlParser:
    return _Parser((DataArguments, ModelConfig, SFTConfig, MonitoringArguments))


def _known_keys() -> set[str]:
    return {f.name for dc in (DataArguments, ModelConfig, SFTConfig, MonitoringArguments) for f in dataclasses.fields(dc)}


def _read_yaml(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"recipe file {path!r} does not exist: pass --config configs/recipes/<name>.yaml")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: must be a mapping of key: value")
    return data


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _known_keys(), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see README.md 'Configuration reference' for valid keys"
    return ConfigError(f"{where}: unknown key {key!r}; {hint}")


def _cli_pairs(argv: list[str]) -> dict[str, str]:
    """`--key value`, `--key=value` and bare `--flag` (= true) -> {key: value}."""
    pairs, i = {}, 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise ConfigError(f"unexpected argument {argv[i]!r}: use --key value")
        key, eq, value = argv[i][2:].partition("=")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value, i = (argv[i + 1], i + 1) if has_value else ("true", i)
        pairs[KEY_ALIASES.get(key, key)] = value
        i += 1
    return pairs


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """`--config recipe.yaml --key value ...` -> validated Recipe. Raises ConfigError on any problem."""
    import tempfile

    import yaml

    cli = _cli_pairs(list(sys.argv[1:] if argv is None else argv))
    path = cli.pop("config", None)
    values = {KEY_ALIASES.get(k, k): v for k, v in (_read_yaml(path) if path else {}).items()}
    for key in values:
        if key not in _known_keys() | {"env"}:
            raise _unknown_key_error(key, f"recipe {path}")
    for key in cli:
        if key not in _known_keys():
            raise _unknown_key_error(key, "command line")
    _check_types(values, f"recipe {path}")
    merged = {**values, **cli}
    if _truthy(merged.get("fp16")) and _truthy(merged.get("bf16")):
        raise ConfigError("fp16 and bf16 are both true: set only one of them (bf16 on Ampere or newer GPUs)")
    # TrlParser reads the (alias-resolved) YAML itself, so it also applies the recipe's `env:` block.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        yaml.safe_dump(values, tmp)
        tmp.flush()
        args = ["--config", tmp.name] + [x for k, v in cli.items() for x in (f"--{k}", v)]
        try:
            data, model, training, monitoring = _parser().parse_args_and_config(args)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    recipe = Recipe(data, model, training, monitoring, path)
    validate(recipe)
    return recipe


def recipe_from_command_line(argv: list[str] | None = None) -> Recipe:
    """For command-line entry points: log to the console, parse the recipe, or exit with its one-line error."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return parse_recipe(argv)
    except ConfigError as err:
        sys.exit(f"medtune: {err}")


def _check_types(values: dict, where: str) -> None:
    """YAML values become argparse defaults, which argparse never type-checks: check them here."""
    hints = {}
    for dc in (DataArguments, ModelConfig, SFTConfig, MonitoringArguments):
        hints.update(typing.get_type_hints(dc))
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or value is None:
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed = tuple(o for o in (typing.get_origin(t) or t for t in options) if isinstance(o, type))
        if not allowed or isinstance(value, allowed):
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        if isinstance(value, str) and not any(t in (bool,) for t in allowed) and str not in allowed:
            continue  # argparse converts strings itself (e.g. "2e-4") and reports its own errors
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{where}: key {key!r} must be {names}, got {value!r} ({type(value).__name__})")


def validate(recipe: Recipe) -> None:
    """Checks that need more than one key, or the file system. Fails fast with the key and the fix."""
    d, m, t = recipe.data, recipe.model, recipe.training
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are both true: QLoRA uses load_in_4bit only")
    if (m.load_in_4bit or m.load_in_8bit) and not m.use_peft:
        raise ConfigError("a quantized base model can only be trained with LoRA: set use_peft: true")
    if t.max_length is None or t.max_length <= TEMPLATE_TOKENS:
        raise ConfigError(
            f"max_length={t.max_length} leaves no room for a sample: the chat template alone takes "
            f"{TEMPLATE_TOKENS} tokens; set max_length (max_seq_length) to e.g. 512"
        )
    if t.packing and t.packing_strategy not in ("bfd", "bfd_split"):
        raise ConfigError(
            f"packing_strategy={t.packing_strategy!r} lets samples share attention: use 'bfd' (keeps sample "
            "boundaries via position_ids)"
        )
    if d.overlong not in ("truncate", "drop"):
        raise ConfigError(f"overlong={d.overlong!r}: use 'truncate' or 'drop'")
    if not 0 <= d.eval_split_size < 1:
        raise ConfigError(f"eval_split_size={d.eval_split_size}: use a fraction in [0, 1)")
    if d.save_every_minutes < 0:
        raise ConfigError(f"save_every_minutes={d.save_every_minutes}: use minutes > 0, or 0 for no time-based "
                          "checkpoints")
    if t.num_train_epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("num_train_epochs and max_steps are both <= 0: set one of them")
    for key in ("dataset_name", "eval_dataset_name"):
        _check_data_source(key, getattr(d, key))
    _check_model_source(m.model_name_or_path)
    if m.lora_r <= 0 or m.lora_alpha <= 0 or not 0 <= m.lora_dropout < 1:
        raise ConfigError(f"LoRA settings r={m.lora_r}, alpha={m.lora_alpha}, dropout={m.lora_dropout}: "
                          "r and alpha must be > 0 and dropout in [0, 1)")
    if t.output_dir is None:
        raise ConfigError("output_dir is not set: add output_dir: <folder> to the recipe")


def _looks_local(value: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path.
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def _check_data_source(key: str, value: str | None) -> None:
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists():
        return
    if _looks_local(value) or path.suffix in {".jsonl", ".json", ".parquet", ".csv"}:
        raise ConfigError(f"{key}={value!r}: no such file or folder; give an existing data file/folder "
                          "(.jsonl/.json/.parquet/.csv) or a hub dataset id like 'nlpie/Llama2-MedTuned-Instructions'")


def _check_model_source(value: str | None) -> None:
    if not value:
        raise ConfigError(f"model_name_or_path is not set: use {STARLING!r} or a local model folder")
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"model_name_or_path={value!r}: folder has no config.json; point it at a model folder")
        return
    if _looks_local(value):
        hint = " (create the demo model with: python -m medtune.tiny --out " + value + ")" if "tiny" in value else ""
        raise ConfigError(f"model_name_or_path={value!r}: no such folder{hint}")
