"""Model loading settings: the 4-bit quantization config for each launcher."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_RECIPE
from medtune.training.config import parse_recipe
from medtune.inference.quantization import quantization_config


@pytest.mark.parametrize("sharded, storage, expected", [
    (False, None, torch.uint8),  # DDP / one GPU: bitsandbytes' packed uint8
    (True, None, torch.bfloat16),  # ZeRO-3 / FSDP: one float dtype per flat parameter, the compute dtype
    (True, "float16", torch.float16),  # an explicit bnb_4bit_quant_storage wins
])
def test_quantization_config_of_the_recipe(tiny_model_dir, sharded, storage, expected):
    argv = ["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_model_dir), "--dtype", "auto"]
    recipe = parse_recipe(argv + (["--bnb_4bit_quant_storage", storage] if storage else []))
    quant = quantization_config(recipe.model, torch.bfloat16, sharded)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.bnb_4bit_quant_storage == expected
    assert (recipe.model.dtype, recipe.model.bnb_4bit_quant_storage) == ("auto", storage)  # the recipe is left as is


def test_no_quantization_without_4_or_8_bit(tiny_model_dir):
    recipe = parse_recipe(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_model_dir),
                           "--load_in_4bit", "false"])
    assert quantization_config(recipe.model, torch.float32, sharded=False) is None
