"""Recipe parsing: the reference values, overrides, one clear error per class of bad recipe, and every shipped
recipe, accelerate and DeepSpeed config loading through the library that reads it."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from conftest import ROOT
from medtune.training.arguments import ALL_LINEAR
from medtune.training.config import ConfigError, parse_recipe

REFERENCE = ROOT / "configs" / "recipes" / "starling_medtuned.yaml"


def test_default_recipe_is_the_reference_recipe():
    r = parse_recipe(["--config", str(REFERENCE)])
    m, t, d = r.model, r.training, r.data
    assert m.model_name_or_path == "berkeley-nest/Starling-LM-7B-alpha"
    assert d.dataset_name == "nlpie/Llama2-MedTuned-Instructions"
    assert (d.train_split, d.eval_split) == ("train", "validation")
    assert m.load_in_4bit is True and m.load_in_8bit is False
    assert m.bnb_4bit_quant_type == "nf4"
    assert m.use_bnb_nested_quant is True
    assert m.dtype == "auto"  # bf16 compute where supported, else fp16 (medtune.inference.load.resolve_dtype)
    assert m.use_peft is True
    assert (m.lora_r, m.lora_alpha, m.lora_dropout) == (8, 16, 0.05)
    assert m.lora_task_type == "CAUSAL_LM"
    assert m.lora_target_modules == ALL_LINEAR
    assert t.output_dir == "adjusted_model"
    assert t.optim == "paged_adamw_32bit"
    assert t.lr_scheduler_type == "cosine"
    assert t.logging_steps == 10
    assert t.save_strategy == "epoch"
    assert t.num_train_epochs == 1 and t.max_steps == -1
    assert t.fp16 is True and t.bf16 is False
    assert t.max_length == 512
    assert t.packing is True and t.packing_strategy == "bfd"
    assert t.completion_only_loss is True
    assert r.checkpointing.save_every_minutes == 30 and r.checkpointing.resume is False
    assert r.after_training.generation_eval_samples == 0 and r.after_training.sample_prompt


def test_overrides_and_alias():
    r = parse_recipe(["--config", str(REFERENCE), "--lora_r", "16", "--max_seq_length=1024", "--resume",
                      "--learning_rate", "1e-4"])
    assert r.model.lora_r == 16
    assert r.training.max_length == 1024
    assert r.checkpointing.resume is True
    assert r.training.learning_rate == pytest.approx(1e-4)


def _recipe(tmp_path, **changes):
    values = yaml.safe_load(REFERENCE.read_text())
    values.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        values.pop(key)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--config", str(path)]


@pytest.mark.parametrize(
    "changes, argv, expected",
    [
        ({"lora_alpah": 16}, [], r"unknown key 'lora_alpah'; did you mean 'lora_alpha'"),
        ({}, ["--lerning_rate", "1e-4"], r"command line: unknown key 'lerning_rate'; did you mean 'learning_rate'"),
        ({"lora_r": 8.5}, [], r"key 'lora_r' must be int, got 8.5"),
        ({"packing": "yes please"}, [], r"key 'packing' must be bool"),
        ({}, ["--lora_r", "eight"], r"argument --lora_r.*invalid int value: 'eight'"),
        ({"fp16": True, "bf16": True}, [], r"fp16 and bf16 are both true"),
        ({"max_seq_length": 8}, [], r"max_length=8 leaves no room for a conversation"),
        ({"packing_strategy": "wrapped"}, [], r"packing_strategy='wrapped' lets samples share attention"),
        ({"dataset_name": "./missing/data.jsonl"}, [], r"dataset_name='./missing/data.jsonl': no such file"),
        ({"eval_dataset_name": "held_out.csv.gz"}, [], r"eval_dataset_name='held_out.csv.gz': no such file"),
        ({"model_name_or_path": "./no/such/model"}, [], r"model_name_or_path='./no/such/model': no such folder"),
        ({"use_peft": False}, [], r"quantized base model can only be trained with LoRA"),
        ({"lora_dropout": 1.5}, [], r"LoRA settings .* dropout in \[0, 1\)"),
        ({"overlong": "squash"}, [], r"overlong"),
        ({}, ["--per_device_train_batch_size", "0"], r"^per_device_train_batch_size=0: use 1 or more$"),
        ({"gradient_accumulation_steps": 0}, [], r"^gradient_accumulation_steps=0: use 1 or more$"),
        ({"eval_split": "train"}, [], r"^eval_split='train' is also train_split: .* eval_split: none$"),
        ({}, ["--max_train_samples", "-5"], r"^max_train_samples=-5: use at least 1"),
        ({"max_eval_samples": -1}, [], r"^max_eval_samples=-1: use 0 or more"),
        ({"env": ["A=1"]}, [], r"`env` field should be a dict"),
        ({}, ["--lora_alph", "8"], r"command line: unknown key 'lora_alph'; did you mean 'lora_alpha'"),
        ({}, ["--packing", "true", "yes"], r"^unexpected argument 'yes': use --key value$"),
        ({}, ["--lora_r", "4", "5"], r"^command line: key 'lora_r' must be int, got \['4', '5'\]"),
    ],
)
def test_bad_recipes_fail_with_the_key_and_the_fix(tmp_path, changes, argv, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_recipe(_recipe(tmp_path, **changes) + argv)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_recipe(["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_recipe(["--config", str(bad)])


@pytest.mark.parametrize("changes, argv, expected", [
    ({"lora_alpah": 16}, [], "unknown key 'lora_alpah'"),
    ({}, ["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0"),
    ({}, ["--eval_split", "train"], "eval_split='train' is also train_split"),
    ({}, ["--max_eval_samples", "-1"], "max_eval_samples=-1"),
])
def test_bad_recipe_fails_before_any_model_or_data_is_loaded(tmp_path, monkeypatch, changes, argv, expected):
    import transformers

    import medtune.data

    def forbidden(*args, **kwargs):
        raise AssertionError("loading started before the recipe was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    monkeypatch.setattr(medtune.data, "prepare_dataset", forbidden)
    from medtune.training.train import main

    with pytest.raises(SystemExit, match=expected):
        main(_recipe(tmp_path, **changes) + argv)


@pytest.mark.parametrize("changes, argv", [({}, ["--lora_target_modules", "q_proj"]),
                                           ({"lora_target_modules": "q_proj"}, []),
                                           ({"lora_target_modules": ["q_proj"]}, [])])
def test_one_lora_target_module_is_a_list(tmp_path, changes, argv):
    """TRL turns a one-item list into a string, which PEFT would match as a regex against the full module path."""
    assert parse_recipe(_recipe(tmp_path, **changes) + argv).model.lora_target_modules == ["q_proj"]


def test_list_keys_take_several_values_on_the_command_line():
    r = parse_recipe(["--config", str(REFERENCE), "--lora_target_modules", "q_proj", "v_proj", "--report_to", "wandb",
                      "tensorboard", "--max-steps", "5", "--packing", "--lora-r=4"])
    assert r.model.lora_target_modules == ["q_proj", "v_proj"] and r.training.report_to == ["wandb", "tensorboard"]
    assert r.training.max_steps == 5 and r.training.packing is True and r.model.lora_r == 4
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_recipe(["stray", "--config", str(REFERENCE)])


def test_an_empty_recipe_takes_replace_and_the_command_line(tmp_path):
    from medtune.training.config import read_recipe

    (tmp_path / "empty.yaml").write_text("")
    r = parse_recipe(["--config", str(tmp_path / "empty.yaml"), "--lora_r", "4"], replace=read_recipe(str(REFERENCE)))
    reference = parse_recipe(["--config", str(REFERENCE), "--lora_r", "4"])
    assert r.path == str(tmp_path / "empty.yaml") and (r.model, r.data) == (reference.model, reference.data)


@pytest.mark.parametrize("main, argv", [("medtune.prepare_data", ["--help"]), ("medtune.prepare_data", ["-h"]),
                                        ("medtune.training.train", ["--config", str(REFERENCE), "--help"])])
def test_help_lists_the_recipe_keys_and_exits_0(main, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(main).main(argv)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--config recipe.yaml [--key value ...]" in out
    assert "--max_length MAX_LENGTH" in out and "--lora-r LORA_R" in out
    assert ("--show N" in out) == (main == "medtune.prepare_data")
    if "--config" in argv:  # the recipe's values are the defaults shown
        assert re.search(r"--max_length MAX_LENGTH.*?\(default: (\w+)\)", out, re.S).group(1) == "512"


def test_chat_template_is_a_jinja_string_or_a_file(tmp_path):
    from medtune.inference.chat_format import read_template

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        r = parse_recipe(_recipe(tmp_path, chat_template=value))
        assert read_template(r.data.chat_template) == template
    with pytest.raises(ConfigError, match="no such file, and not a Jinja template"):
        parse_recipe(_recipe(tmp_path, chat_template="templates/missing.jinja"))
    with pytest.raises(ConfigError, match="medtune reads chat_template"):
        parse_recipe(_recipe(tmp_path, chat_template_path="t.jinja"))
    # a syntax error stops at validation, named, in the string or in the file
    broken = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"
    (tmp_path / "broken.jinja").write_text(broken)
    for value in (broken, str(tmp_path / "broken.jinja")):
        with pytest.raises(ConfigError, match=r"^chat_template: Jinja syntax error at line 2: unexpected '}'"):
            parse_recipe(_recipe(tmp_path, chat_template=value))


def test_lora_target_modules_keywords_and_regexes_stay_strings(tmp_path):
    for value in ("all-linear", r".*\.(q|v)_proj"):
        assert parse_recipe(_recipe(tmp_path, lora_target_modules=value)).model.lora_target_modules == value


def test_env_block_is_set_and_replace_unsets_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_TEST_ENV", "restored after the test")
    argv = _recipe(tmp_path, env={"MEDTUNE_TEST_ENV": 7}, eval_dataset_name="data/sample/medtuned_sample_eval.jsonl")
    recipe = parse_recipe(argv, replace={"eval_dataset_name": None, "lora_r": 4})
    assert os.environ["MEDTUNE_TEST_ENV"] == "7"
    assert recipe.data.eval_dataset_name is None and recipe.model.lora_r == 4
    assert parse_recipe(argv + ["--lora_r", "2"], replace={"lora_r": 4}).model.lora_r == 2  # the command line wins


# ---- Every shipped config loads through the library that reads it ------------------------------------------------

CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses_and_validates(path, tiny_model_dir, monkeypatch):
    from medtune.training.config import read_recipe

    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    local_model = read_recipe(str(path))["model_name_or_path"].startswith(".")  # the demo model `make demo` builds
    recipe = parse_recipe(["--config", str(path)],
                          replace={"model_name_or_path": str(tiny_model_dir)} if local_model else None)
    assert recipe.path == str(path) and recipe.model.use_peft and recipe.training.output_dir


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads(path):
    """accelerate's own loader, and every nested key is an option `accelerate launch` copies it to."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    options = {action.dest for action in launch_command_parser()._actions}
    for key in config.deepspeed_config or {}:
        assert key in options, key
    for key in config.fsdp_config or {}:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in options, key
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert (ROOT / config.deepspeed_config["deepspeed_config_file"]).is_file()
    assert config.num_processes >= config.num_machines >= 1


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_is_valid_once_the_trainer_fills_auto(path):
    """transformers fills the "auto" values from the reference recipe and the model; DeepSpeed's own config class
    then validates the result (unknown keys, batch-size arithmetic, ZeRO settings)."""
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from medtune.tiny import STARLING_CONFIG

    args = parse_recipe(["--config", str(REFERENCE)]).training
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**STARLING_CONFIG))
    hf_config = HfTrainerDeepSpeedConfig(str(path))
    hf_config.trainer_config_process(args)
    hf_config.trainer_config_finalize(args, model, num_training_steps=100)
    config = DeepSpeedConfig(hf_config.config)
    assert config.zero_optimization_stage == int(path.stem.removeprefix("zero")[0])
    assert config.train_micro_batch_size_per_gpu == args.per_device_train_batch_size
