"""Shared fixtures: the tiny Starling-shaped model, the bundled sample data, and recipes built from tiny.yaml."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "configs" / "recipes" / "tiny.yaml"

# A resumed run repeats the uninterrupted run's per-step losses (bit for bit on these CPU runs); the tolerance only
# allows for float summation order. An optimizer state rounded to bf16 on reload alone moved them by ~1e-5.
RESUME_RTOL = 1e-6

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers, rendezvous and Slurm daemons in the tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(checkpoint: Path) -> dict[int, float]:
    """Per-step training losses recorded in a checkpoint's trainer_state.json."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from medtune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-starling"))


@pytest.fixture(scope="session")
def random_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A randomly initialised LoRA adapter on the tiny model (so tuned and base replies differ)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sample_train_file() -> Path:
    return ROOT / "data" / "sample" / "medtuned_sample.jsonl"


@pytest.fixture(scope="session")
def sample_eval_file() -> Path:
    return ROOT / "data" / "sample" / "medtuned_sample_eval.jsonl"


@pytest.fixture
def tiny_args(tiny_model_dir, tmp_path):
    """Command-line arguments for the tiny recipe, isolated in tmp_path; extend with more `--key value`."""
    return [
        "--config", str(TINY_RECIPE),
        "--model_name_or_path", str(tiny_model_dir),
        "--output_dir", str(tmp_path / "out"),
        "--data_cache_dir", str(tmp_path / "data-cache"),
    ]
