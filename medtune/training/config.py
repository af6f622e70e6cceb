"""A YAML recipe plus `--key value` overrides -> a validated `Recipe`, before anything heavy runs.

Parsing is TRL's `TrlParser.parse_args_and_config` (the same flat YAML recipes as TRL scripts and alignment-handbook)
over the dataclasses of medtune.training.arguments: the recipe's values become the parser's defaults and the command
line overrides them. The checks here name the key and the fix in one line, so a bad recipe fails in a second, not after
the model has loaded.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

from trl import TrlParser

from medtune.training.arguments import ARGUMENTS, STARLING, Recipe
from medtune.data import mixture
from medtune.data.rows import FILE_TYPES, data_format

# Older TRL recipes (and the reference recipe) say max_seq_length; TRL now calls it max_length.
KEY_ALIASES = {"max_seq_length": "max_length"}
MIXTURE_KEYS = ("datasets", "eval_datasets")
# Below this, a chat template's own tokens leave no room for a conversation (Starling's take 20 for one turn pair).
MIN_LENGTH = 32


class ConfigError(ValueError):
    """A recipe problem, reported before any model or data is loaded."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help as TrlParser prints it (each key with its default), the description as written."""


class _Parser(TrlParser):
    """TrlParser, which reads the recipe (`--config`, its `env:` block) and the command line over it, plus what it
    lacks for medtune's recipes; each addition says what TrlParser lacks."""

    def __init__(self, path: str | None, description: str | None = None):
        # allow_abbrev=False: argparse would take a misspelt key for a key it abbreviates (--lora_alph as --lora_alpha).
        # usage: TrlParser's lists every key, some 300 of them, and not --config.
        super().__init__(ARGUMENTS, allow_abbrev=False, usage="%(prog)s --config recipe.yaml [--key value ...]",
                         description=description, formatter_class=_HelpFormatter)
        self.where = f"recipe {path}"
        self.overrides: dict = {}  # values that take the place of the recipe's (parse_recipe's `replace`)
        self.mixtures: dict = {}

    def error(self, message: str):  # argparse would print the whole usage and exit; one line is clearer
        raise ConfigError(f"{message} (see README.md 'Configuration reference')")

    def set_defaults_with_config(self, **config) -> list[str]:
        # TrlParser takes the recipe's keys as written, and lists unknown ones only after parsing, as "--key value"
        # strings without the file or a suggestion; argparse never type-checks these values (they become defaults).
        values = {**{KEY_ALIASES.get(k, k): v for k, v in config.items()}, **self.overrides}
        for key in values:
            if key not in _known_keys():
                raise _unknown_key_error(key, self.where)
        # A list of mappings is no argparse value: kept out of the parser and set on the parsed recipe as written.
        self.mixtures = {key: values.pop(key) for key in MIXTURE_KEYS if key in values}
        _check_types(values, self.where)
        return super().set_defaults_with_config(**values)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # TrlParser reports the words it cannot use in one list, once the dataclasses are built: name the first.
        if extras and extras[0].startswith("--"):
            raise _unknown_key_error(extras[0][2:], "command line")
        if extras:
            raise ConfigError(f"unexpected argument {extras[0]!r}: use --key value")
        # SFTConfig refuses both too, but without the fix.
        if namespace.fp16 and namespace.bf16:
            raise ConfigError("fp16 and bf16 are both true: set only one of them (bf16 on Ampere or newer GPUs)")
        return namespace, extras


def _known_keys() -> set[str]:
    return {f.name for dc in ARGUMENTS for f in fields(dc)}


def read_recipe(path: str) -> dict:
    """The key: value mapping of a recipe file, older key names resolved (KEY_ALIASES). TrlParser reads the file too,
    but a missing or malformed one is a traceback there, and its messages name no file."""
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"recipe file {path!r} does not exist: pass --config configs/recipes/<name>.yaml")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: must be a mapping of key: value")
    if not isinstance(data.get("env", {}), dict):
        raise ConfigError(f"recipe {path}: `env` field should be a dict in the YAML file")
    return {KEY_ALIASES.get(k, k): v for k, v in data.items()}


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _known_keys(), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see README.md 'Configuration reference' for valid keys"
    return ConfigError(f"{where}: unknown key {key!r}; {hint}")


def _command_line(argv: list[str]) -> list[tuple[str, list[str]]]:
    """[(key, its values), ...] in order, words before the first key under "". Keys are read with dashes as
    underscores and older names resolved (TrlParser knows --max-steps, not --max-seq-length), --key=value as --key
    value (TrlParser reads --config only as `--config path`). A key takes every value up to the next --key, so list
    keys take several (--lora_target_modules q_proj v_proj)."""
    pairs: list[tuple[str, list[str]]] = [("", [])]
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            key = name.replace("-", "_")
            pairs.append((KEY_ALIASES.get(key, key), [value] if eq else []))
        else:
            pairs[-1][1].append(arg)
    return pairs


def parse_recipe(argv: list[str] | None = None, replace: dict | None = None, description: str | None = None) -> Recipe:
    """`--config recipe.yaml --key value ...` -> validated Recipe. Raises ConfigError on any problem; --help prints
    the recipe keys (below `description`) and exits.

    `replace`: recipe values that take the place of the file's (typed, as in YAML; None unsets a key) before the
    command line applies, for callers that build on a recipe file programmatically.
    """
    pairs = _command_line(list(sys.argv[1:] if argv is None else argv))
    path = next((values[-1] for key, values in reversed(pairs) if key == "config" and values), None)
    for key, _ in pairs:
        if key in MIXTURE_KEYS:
            raise ConfigError(f"{key} is a list of datasets: set it in the recipe file (docs/DATA.md \"Mixtures\")")
    parser = _Parser(path, description)
    # TrlParser gives a key typed `str | list[str]` (report_to) one value: several are given as the list. argparse's
    # map of option strings to actions is private (pinned in tests/test_private_apis.py).
    actions = parser._option_string_actions
    lists = {k: v for k, v in pairs if len(v) > 1 and f"--{k}" in actions and actions[f"--{k}"].nargs is None}
    _check_types(lists, "command line")
    parser.overrides = {**(replace or {}), **lists}
    args = [x for key, values in pairs if key not in ("config", *lists)
            for x in ([f"--{key}"] if key else []) + values]
    if path and read_recipe(path):
        args = ["--config", path, *args]
    else:  # TrlParser sets defaults only from a recipe file (and refuses an empty one): set `replace` and lists here
        parser.set_defaults_with_config()
    try:
        parsed = parser.parse_args_and_config(args)
    except ValueError as err:  # a dataclass refusing a value
        raise ConfigError(str(err)) from None
    recipe = Recipe(*parsed, path)
    for key, value in parser.mixtures.items():
        setattr(recipe.data, key, value)
    _one_module_is_a_list(recipe.model)
    validate(recipe)
    return recipe


def _one_module_is_a_list(model) -> None:
    # TRL's ModelConfig turns a one-item lora_target_modules into a string, which PEFT matches as a regex against
    # the full module path ("q_proj" then matches nothing); a plain module name is meant as a one-item list.
    if isinstance(model.lora_target_modules, str) and re.fullmatch(r"[\w.]+", model.lora_target_modules):
        model.lora_target_modules = [model.lora_target_modules]


def recipe_from_command_line(argv: list[str] | None = None, description: str | None = None) -> Recipe:
    """For command-line entry points: the parsed recipe, or exit with its one-line error (or after --help)."""
    try:
        return parse_recipe(argv, description=description)
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

        # Compiled as apply_chat_template compiles it (medtune.inference.chat_format), so a syntax error stops here.
        from transformers.utils.chat_template_utils import _compile_jinja_template

        from medtune.inference.chat_format import read_template

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
    from medtune.inference.gguf import gguf_file, is_gguf

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
