"""The command-line words medtune's commands share, so that one flag means one thing everywhere:

    --model   the model folder / hub id, or LoRA adapter folder, a command works on
    --out     the folder a command writes into
    --dtype   the dtype of the model's weights
    --device  where the model runs

Recipe keys (medtune-train, medtune-prepare-data) are spelled as in the YAML (--max_steps); --max-steps works too.
"""

from __future__ import annotations

import argparse

INFERENCE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device of a command that loads a model to generate with (medtune.inference)."""
    parser.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                        help="weights' dtype (default: auto = bf16, or fp16 without bf16, on a GPU; fp32 on CPU)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
