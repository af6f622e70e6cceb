"""A YAML recipe plus `--key value` overrides -> a validated `Recipe`, before anything heavy runs.

Parsing is TRL's `TrlParser` (the same flat YAML recipes as TRL scripts and alignment-handbook) over the dataclasses
of medtune.arguments: the recipe's values become the parser's defaults and the command line overrides them. The
checks here name the key and the fix in one line, so a bad recipe fails in a second, not after the model has loaded.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

from trl import TrlParser

from medtune.arguments import ARGUMENTS, STARLING, Recipe
from medtune.data import mixture
from medtune.data.rows import FILE_TYPES, data_format

# Older TRL recipes (and the reference recipe) say max_seq_length; TRL now calls it max_length.
KEY_ALIASES = {"max_seq_length": "max_length"}
MIXTURE_KEYS = ("datasets", "eval_datasets")
# Below this, a chat template's own tokens leave no room for a conversation (Starling's take 20 for one turn pair).
MIN_LENGTH = 32


class ConfigError(ValueError):
    """A recipe problem, reported before any model or data is loaded."""


class _Parser(TrlParser):
    def error(self, message: str):  # argparse would print the whole usage and exit; one line is clearer
        raise ConfigError(f"{message} (see README.md 'Configuration reference')")


def _known_keys() -> set[str]:
    return {f.name for dc in ARGUMENTS for f in fields(dc)}


def read_recipe(path: str) -> dict:
    """The key: value mapping of a recipe file, older key names resolved (KEY_ALIASES)."""
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"recipe file {path!r} does not exist: pass --config configs/recipes/<name>.yaml")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: must be a mapping of key: value")
    return {KEY_ALIASES.get(k, k): v for k, v in data.items()}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _known_keys(), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see README.md 'Configuration reference' for valid keys"
    return ConfigError(f"{where}: unknown key {key!r}; {hint}")


def _command_line(argv: list[str]) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """(--config's value, [(key, its values), ...] in order) with keys spelled as the dataclasses do: dashes read as
    underscores (--max-steps as --max_steps, as transformers' HfArgumentParser accepts it) and older names resolved.
    A key takes every value up to the next --key, so list keys take several (--lora_target_modules q_proj v_proj)."""
    pairs: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            key = name.replace("-", "_")
            pairs.append((KEY_ALIASES.get(key, key), [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --key value")
    config = next((values[-1] for key, values in reversed(pairs) if key == "config" and values), None)
    return config, [(key, values) for key, values in pairs if key != "config"]


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def parse_recipe(argv: list[str] | None = None, replace: dict | None = None) -> Recipe:
    """`--config recipe.yaml --key value ...` -> validated Recipe. Raises ConfigError on any problem.

    `replace`: recipe values that take the place of the file's (typed, as in YAML; None unsets a key) before the
    command line applies, for callers that build on a recipe file programmatically.
    """
    path, pairs = _command_line(list(sys.argv[1:] if argv is None else argv))
    cli = dict(pairs)
    where = f"recipe {path}"
    values = {**(read_recipe(path) if path else {}), **(replace or {})}
    env = values.pop("env", {})
    if not isinstance(env, dict):
        raise ConfigError(f"{where}: `env` field should be a dict in the YAML file")
    for key in values:
        if key not in _known_keys():
            raise _unknown_key_error(key, where)
    for key in cli:
        if key not in _known_keys():
            raise _unknown_key_error(key, "command line")
        if key in MIXTURE_KEYS:
            raise ConfigError(f"{key} is a list of datasets: set it in the recipe file (docs/DATA.md \"Mixtures\")")
    # A list of mappings is no argparse value: kept out of the parser and set on the parsed recipe as written.
    mixtures = {key: values.pop(key) for key in MIXTURE_KEYS if key in values}
    _check_types(values, where)
    merged = {**values, **{k: v[-1] if v else True for k, v in cli.items()}}
    if _truthy(merged.get("fp16")) and _truthy(merged.get("bf16")):
        raise ConfigError("fp16 and bf16 are both true: set only one of them (bf16 on Ampere or newer GPUs)")
    os.environ.update({key: str(value) for key, value in env.items()})  # TrlParser's `env:` block, as it does it
    parser = _Parser(ARGUMENTS)
    # Keys typed `str | list[str]` (report_to) get one value from argparse: several values are given as the list.
    lists = {k: v for k, v in cli.items() if len(v) > 1 and parser._option_string_actions[f"--{k}"].nargs is None}
    parser.set_defaults_with_config(**{**values, **lists})
    args = [x for key, vals in pairs if key not in lists for x in (f"--{key}", *vals)]
    try:
        parsed = parser.parse_args_into_dataclasses(args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    recipe = Recipe(*parsed, path)
    for key, value in mixtures.items():
        setattr(recipe.data, key, value)
    _one_module_is_a_list(recipe.model)
    validate(recipe)
    return recipe


def _one_module_is_a_list(model) -> None:
    # TRL's ModelConfig turns a one-item lora_target_modules into a string, which PEFT matches as a regex against
    # the full module path ("q_proj" then matches nothing); a plain module name is meant as a one-item list.
    if isinstance(model.lora_target_modules, str) and re.fullmatch(r"[\w.]+", model.lora_target_modules):
        model.lora_target_modules = [model.lora_target_modules]


def recipe_from_command_line(argv: list[str] | None = None) -> Recipe:
    """For command-line entry points: the parsed recipe, or exit with its one-line error."""
    try:
        return parse_recipe(argv)
    except ConfigError as err:
        sys.exit(f"medtune: {err}")


def _check_types(values: dict, where: str) -> None:
    """YAML values become argparse defaults, which argparse never type-checks: check them here."""
    hints = {}
    for dc in ARGUMENTS:
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
    if t.max_length is None or t.max_length < MIN_LENGTH:
        raise ConfigError(f"max_length={t.max_length} leaves no room for a conversation and its chat template; set "
                          "max_length (max_seq_length) to e.g. 512")
    if t.chat_template_path:
        raise ConfigError("chat_template_path is TRL's key; medtune reads chat_template (a Jinja string or a .jinja "
                          "file): set that instead")
    if d.chat_template and "{" not in d.chat_template and not Path(d.chat_template).expanduser().is_file():
        raise ConfigError(f"chat_template={d.chat_template!r}: no such file, and not a Jinja template")
    if d.chat_template:
        from jinja2 import TemplateSyntaxError

        # Compiled as apply_chat_template compiles it (medtune.chat_format), so a syntax error stops here.
        from transformers.utils.chat_template_utils import _compile_jinja_template

        from medtune.chat_format import read_template

        try:
            _compile_jinja_template(read_template(d.chat_template))
        except TemplateSyntaxError as err:
            raise ConfigError(f"chat_template: Jinja syntax error at line {err.lineno}: {err.message}; fix the "
                              "template (a Jinja string or a .jinja file)") from None
    if t.packing and t.packing_strategy not in ("bfd", "bfd_split"):
        raise ConfigError(
            f"packing_strategy={t.packing_strategy!r} lets samples share attention: use 'bfd' (keeps sample "
            "boundaries via position_ids)"
        )
    if d.overlong not in ("truncate", "drop"):
        raise ConfigError(f"overlong={d.overlong!r}: use 'truncate' or 'drop'")
    if not 0 <= d.eval_split_size < 1:
        raise ConfigError(f"eval_split_size={d.eval_split_size}: use a fraction in [0, 1)")
    if d.eval_split == d.train_split and not d.eval_dataset_name:
        raise ConfigError(f"eval_split={d.eval_split!r} is also train_split: evaluation would score rows the model "
                          "trains on; use another split (e.g. validation), eval_dataset_name, or eval_split: none")
    if d.max_train_samples is not None and d.max_train_samples < 1:
        raise ConfigError(f"max_train_samples={d.max_train_samples}: use at least 1, or leave it unset for all rows")
    if d.max_eval_samples is not None and d.max_eval_samples < 0:
        raise ConfigError(f"max_eval_samples={d.max_eval_samples}: use 0 or more (0: no evaluation), or leave it "
                          "unset for all rows")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{key}={getattr(t, key)}: use 1 or more")
    if recipe.checkpointing.save_every_minutes < 0:
        raise ConfigError(f"save_every_minutes={recipe.checkpointing.save_every_minutes}: use minutes > 0, or 0 for no "
                          "time-based checkpoints")
    if t.num_train_epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("num_train_epochs and max_steps are both <= 0: set one of them")
    for key in ("dataset_name", "eval_dataset_name", "consultation_eval_dataset"):
        _check_data_source(key, getattr(d, key))
    for key in MIXTURE_KEYS:
        if getattr(d, key) is not None:
            try:
                mixture.parse(getattr(d, key), key)
            except mixture.MixtureError as err:
                raise ConfigError(str(err)) from None
    if d.safety_regression not in ("warn", "stop"):
        raise ConfigError(f"safety_regression={d.safety_regression!r}: use 'warn' or 'stop'")
    if d.safety_tolerance < 0:
        raise ConfigError(f"safety_tolerance={d.safety_tolerance}: use 0 or more emergencies")
    if d.consultation_eval_max_new_tokens < 1:
        raise ConfigError(f"consultation_eval_max_new_tokens={d.consultation_eval_max_new_tokens}: use 1 or more")
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
    if _looks_local(value) or data_format(path):
        raise ConfigError(f"{key}={value!r}: no such file or folder; give an existing data file/folder "
                          f"({FILE_TYPES}) or a hub dataset id like 'nlpie/Llama2-MedTuned-Instructions'")


def _check_model_source(value: str | None) -> None:
    from medtune.gguf import gguf_file, is_gguf

    if not value:
        raise ConfigError(f"model_name_or_path is not set: use {STARLING!r} or a local model folder")
    if is_gguf(value):
        try:
            gguf_file(value)
        except FileNotFoundError as err:
            raise ConfigError(f"model_name_or_path={value!r}: {err}") from None
        return
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"model_name_or_path={value!r}: folder has no config.json; point it at a model folder")
        return
    if _looks_local(value):
        hint = " (create the demo model with: python -m medtune.tiny --out " + value + ")" if "tiny" in value else ""
        raise ConfigError(f"model_name_or_path={value!r}: no such folder{hint}")
