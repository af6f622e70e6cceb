"""The command-line words medtune's commands share, so that one flag means one thing everywhere:

    --model   the model folder / hub id, or LoRA adapter folder, a command works on
    --out     the folder a command writes into
    --dtype   the dtype of the model's weights
    --device  where the model runs
    --adapter-base  the base weights a LoRA adapter trained on a quantised base runs on
    --engine  what runs a model to generate with: transformers, or llama.cpp for a .gguf file

Recipe keys (medtune-train, medtune-prepare-data) are spelled as in the YAML (--max_steps); --max-steps works too.
--help lists them, with the values of the recipe given before it (--config R --help) as the defaults.
"""

from __future__ import annotations

import argparse

INFERENCE_DTYPES = ("auto", "bfloat16", "float16", "float32")
ADAPTER_BASES = ("as-trained", "original")
ENGINES = ("auto", "llama.cpp", "transformers")


def add_adapter_base_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter-base", choices=ADAPTER_BASES, default="as-trained",
                        help="for a LoRA adapter trained on a 4-bit or 8-bit base (its run_info.json says so): "
                             "as-trained runs it on the base's weights as training saw them (quantised as then, "
                             "then de-quantised); original on the base's own weights (default: %(default)s)")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --device, --engine and --adapter-base of a command that loads a model to generate with
    (medtune.inference.load)."""
    parser.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                        help="weights' dtype (default: auto = bf16, or fp16 without bf16, on a GPU; fp32 on CPU)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="what runs the model: llama.cpp (a .gguf file, on CPU) or transformers (default: auto = "
                             "llama.cpp for a .gguf file when llama-cpp-python is installed)")
    add_adapter_base_argument(parser)
