"""One command-line grammar: --model, --out, --dtype and --device mean the same in every command, and the older
spellings (medtune-export's positional adapter, medtune-eval's --output, recipe keys with dashes) still work."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_RECIPE
from medtune.export import merge as export
from medtune.inference import chat
from medtune.training.config import parse_recipe
from medtune.eval import run as eval_run
from medtune.inference.load import load_for_inference_or_demo
from medtune.serve import cli as serve_cli


def test_export_takes_the_adapter_as_model_or_positional():
    by_flag = export.parse_args(["--model", "adapter", "--out", "merged"])
    positional = export.parse_args(["adapter", "--out", "merged"])
    assert by_flag.model == positional.model == "adapter" and by_flag.out == positional.out == "merged"
    assert export.parse_args(["adapter", "--model", "adapter", "--out", "m"]).model == "adapter"
    with pytest.raises(SystemExit):
        export.parse_args(["--out", "merged"])  # no adapter
    with pytest.raises(SystemExit):
        export.parse_args(["one", "--model", "other", "--out", "merged"])


def test_eval_output_is_an_alias_of_out():
    argv = ["--model", "m", "--data", "rows.jsonl"]
    assert eval_run.parse_args([*argv, "--output", "r"]).out == eval_run.parse_args([*argv, "--out", "r"]).out == "r"


@pytest.mark.parametrize("parse", [
    lambda argv: serve_cli.parser().parse_args(argv),
    lambda argv: chat.parser().parse_args(argv),
    lambda argv: eval_run.parse_args([*argv, "--data", "rows.jsonl"]),
], ids=["serve", "chat", "eval"])
def test_model_dtype_and_device_are_spelled_alike(parse):
    args = parse(["--model", "m", "--dtype", "bfloat16", "--device", "cpu"])
    assert (args.model, args.dtype, args.device) == ("m", "bfloat16", "cpu")
    assert parse(["--model", "m"]).dtype == "auto"
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--dtype", "fp8"])


def test_dtype_reaches_the_loaded_model(tiny_model_dir):
    model, _ = load_for_inference_or_demo(tiny_model_dir, "cpu", "bfloat16")
    assert model.dtype == torch.bfloat16
    model, _ = load_for_inference_or_demo(tiny_model_dir, "cpu", "auto")
    assert model.dtype == torch.float32  # auto on CPU


def test_recipe_keys_with_dashes(tiny_model_dir):
    recipe = parse_recipe(["--config", str(TINY_RECIPE), "--model-name-or-path", str(tiny_model_dir),
                           "--max-steps", "3", "--save-every-minutes=5"])
    assert recipe.training.max_steps == 3 and recipe.checkpointing.save_every_minutes == 5
