"""4-bit QLoRA training of the tiny Starling-shaped model: loss falls, the adapter reloads, generation stops."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.training.config import parse_recipe

pytestmark = pytest.mark.slow

NLI = '"source": "MedNLI"'  # one-word replies: a tiny random model learns them (and the end of turn) quickly


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory, sample_train_file):
    from medtune.training.train import train

    tmp = tmp_path_factory.mktemp("train")
    rows = [line for line in sample_train_file.read_text().splitlines() if NLI in line]
    data = tmp / "nli.jsonl"
    data.write_text("\n".join(rows) + "\n")
    first = json.loads(rows[0])
    recipe = parse_recipe([
        "--config", "configs/recipes/tiny.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--output_dir", str(tmp / "out"), "--data_cache_dir", str(tmp / "cache"),
        "--dataset_name", str(data), "--eval_split", "none", "--max_seq_length", "256",
        "--max_steps", "40", "--learning_rate", "2e-2", "--logging_steps", "1", "--save_strategy", "no",
        "--sample_prompt", f"{first['instruction']}\n\n{first['input']}",
    ])
    return recipe, train(recipe), rows


def test_loss_falls(trained):
    _, result, _ = trained
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_adapter_is_complete_and_reloads_to_the_same_logits(trained):
    from peft import PeftModel
    from safetensors.torch import load_file

    from medtune.training.model import load_model

    recipe, result, _ = trained
    tensors = load_file(result.adapter_path)
    # r=8 LoRA A and B on 7 projections in each of the 2 layers, none empty, B trained away from zero.
    assert len(tensors) == 2 * 7 * 2
    assert all(t.numel() > 0 for t in tensors.values())
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    assert (result.output_dir / "adapter_config.json").exists()
    assert (result.output_dir / "tokenizer_config.json").exists()
    card = (result.output_dir / "README.md").read_text()  # medtune's card, not TRL's "fine-tuned version of [None]"
    assert "[None]" not in card and "## Datasets and licences" in card and "not a doctor" in card
    assert f"| `{recipe.data.dataset_name}` | training |" in card

    reloaded = PeftModel.from_pretrained(load_model(recipe), result.output_dir).eval()
    trained_model = result.model.eval()
    # TRL keeps QLoRA adapter weights in bf16 while training; hold the reloaded ones in the same dtype.
    trained_dtypes = {n: p.dtype for n, p in trained_model.named_parameters() if "lora_" in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(trained_dtypes[name])
    ids = torch.tensor([[1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 12014, 32000]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_generation_with_the_trained_adapter_stops_at_end_of_turn(trained):
    from medtune.inference.chat_format import user_message
    from medtune.inference.decoding import complete
    from medtune.inference.load import load_for_inference

    _, result, rows = trained
    assert result.sample_answer.finish_reason == "stop" and result.sample_answer.text
    assert "<|end_of_turn|>" not in result.sample_answer.text
    model, fmt = load_for_inference(result.output_dir)  # the serving path: adapter on the NF4 round trip of its base
    conversations = [[{"role": "user", "content": user_message(r["instruction"], r["input"])}]
                     for r in map(json.loads, rows[:4])]
    for c in complete(model, fmt, conversations, max_new_tokens=32):
        assert c.finish_reason == "stop" and c.completion_tokens < 32
        assert "<|end_of_turn|>" not in c.text


# The tiny recipe's first five losses (logged every step) on the bundled sample, CPU, fp32, the tiny model of
# `python -m medtune.tiny` (seed 0); measured with torch 2.13.0, transformers 5.24.0, trl 1.16.0, peft 0.21.2,
# bitsandbytes 0.50.2. Runs repeat them to the last digit; the tolerance (about 1e-3 at a loss of 10) allows for
# float summation order on other CPUs. Changes to the data path or model setup move them further, measured: the loss
# on the whole text instead of the reply by up to 0.27, TRL's "wrapped" packing instead of BFD by 0.12, packing off
# by 0.086, 4-bit without double quantization by 0.0035, LoRA dropout 0.1 instead of 0.05 by 0.004.
TINY_RECIPE_LOSSES = [10.768878, 10.601283, 10.433356, 10.357376, 9.957361]


def test_tiny_recipe_first_losses_are_pinned(tiny_model_dir, tmp_path):
    from medtune.training.train import build_run

    recipe = parse_recipe([
        "--config", "configs/recipes/tiny.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache"),
        "--max_steps", str(len(TINY_RECIPE_LOSSES)), "--logging_steps", "1", "--save_strategy", "no",
        "--sample_prompt", "", "--generation_eval_samples", "0",
    ])
    trainer = build_run(recipe).trainer
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(TINY_RECIPE_LOSSES), rtol=1e-4, atol=1e-4)


def _tiny_recipe(tiny_model_dir, tmp_path, *overrides: str):
    return parse_recipe([
        "--config", "configs/recipes/tiny.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache"), "--max_length", "128",
        "--logging_steps", "1", "--eval_strategy", "no", "--sample_prompt", "", "--generation_eval_samples", "0",
        *overrides,
    ])


def test_negative_save_every_minutes_is_refused(tiny_model_dir, tmp_path):
    from medtune.training.config import ConfigError

    with pytest.raises(ConfigError, match="save_every_minutes=-5.0: use minutes > 0, or 0"):
        _tiny_recipe(tiny_model_dir, tmp_path, "--save_every_minutes", "-5")


def test_timed_checkpoints_follow_the_clock(tiny_model_dir, tmp_path):
    """save_every_minutes=2 on a clock that advances one minute per step: a checkpoint at steps 2, 4 and 6. Step 6
    also ends the epoch loop (save_strategy epoch), which must not save it a second time; save_total_limit=2 keeps
    the two newest, deleted only once the new one is complete."""
    from transformers import TrainerCallback

    from medtune.checkpoints import COMPLETE_MARKER, checkpoints, find_resume_checkpoint
    from medtune.training.train import build_run

    class Clock(TrainerCallback):
        now = 0.0

        def __call__(self) -> float:
            return self.now

        def on_step_begin(self, args, state, control, **kwargs):
            self.now += 60

        def on_save(self, args, state, control, **kwargs):
            saves.append(state.global_step)

    saves: list[int] = []
    run = build_run(_tiny_recipe(tiny_model_dir, tmp_path, "--max_steps", "6", "--save_strategy", "epoch",
                                 "--save_every_minutes", "2", "--save_total_limit", "2"))
    clock = Clock()
    run.preemption.clock = clock
    run.trainer.add_callback(clock)
    run.trainer.train()

    assert saves == [2, 4, 6]
    out = tmp_path / "out"
    assert [p.name for p in checkpoints(out)] == ["checkpoint-6", "checkpoint-4"]
    assert all((p / COMPLETE_MARKER).is_file() for p in checkpoints(out))
    assert find_resume_checkpoint(out) == str(out / "checkpoint-6")


def test_killed_run_resumes_from_the_last_timed_checkpoint(tiny_model_dir, tmp_path):
    """SIGKILL (no warning, no handler) after a few timed checkpoints, maybe in the middle of the next one: the rerun
    resumes from the newest complete checkpoint and trains on from its step to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, losses
    from medtune.checkpoints import find_resume_checkpoint, step_of

    steps, out = 12, tmp_path / "out"
    args = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/recipes/tiny.yaml",
            "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
            "--data_cache_dir", str(tmp_path / "cache"), "--max_length", "128", "--logging_steps", "1",
            "--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no",
            "--save_every_minutes", "0.01", "--sample_prompt", "", "--generation_eval_samples", "0",
            "--report_to", "none", "--resume", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while (ckpt := find_resume_checkpoint(out)) is None or step_of(ckpt) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "no timed checkpoint before the run ended"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    last = find_resume_checkpoint(out)
    assert last is not None and 3 <= step_of(last) < steps

    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"resuming from {last}" in resumed.stderr
    logged = losses(out)  # the final trainer_state.json: the first run's steps up to the checkpoint, then the rerun's
    assert sorted(logged) == list(range(1, steps + 1))
    assert (out / "adapter_model.safetensors").exists()
