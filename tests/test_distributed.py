"""Multi-process QLoRA training on CPU (2 processes, gloo) under each accelerate config, preemption and exact resume.

Each run is a real `accelerate launch launch/train.py` of the tiny recipe: DDP, DeepSpeed ZeRO-2 and ZeRO-3
(4-bit weights stored in the compute dtype and sharded). The saved adapter must be complete (ZeRO-3 keeps only
a shard of every weight per rank) and equal to what was trained: for DeepSpeed it is checked against the fp32
weights DeepSpeed itself reconstructs from the optimizer shards of the checkpoint. FSDP cannot run through
accelerate on CPU (it selects FSDP only on GPUs); its QLoRA loading is checked with torch's FSDP directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.training.preemption import EXIT_PREEMPTED
from conftest import RESUME_RTOL, ROOT, free_port, losses

ACCELERATE = ROOT / "configs" / "accelerate"

pytestmark = pytest.mark.slow


def launch_cmd(config: str, args: list[str], processes: int = 2, launcher: str = "accelerate.commands.launch"):
    return [sys.executable, "-m", launcher, "--config_file", str(ACCELERATE / config),
            "--num_processes", str(processes), "--main_process_port", str(free_port()),
            str(ROOT / "launch" / "train.py"), *args]


def cpu_env(config: str) -> dict[str, str]:
    """CPU switches: DDP needs accelerate's CPU state; DeepSpeed finds its CPU accelerator by itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    if "deepspeed" not in config:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run_args(tiny_args: list[str], steps: int, **overrides) -> list[str]:
    """Tiny recipe, short and deterministic: one checkpoint at the last step, a loss logged every step."""
    keys = {"max_steps": steps, "max_length": 128, "learning_rate": 1e-2, "logging_steps": 1,
            "eval_strategy": "no", "save_strategy": "steps", "save_steps": steps, "ddp_backend": "gloo",
            "sample_prompt": "", "generation_eval_samples": 0, "report_to": "none", **overrides}
    return [*tiny_args, *(x for k, v in keys.items() for x in (f"--{k}", str(v)))]


def check_ok(proc: subprocess.CompletedProcess, expected: int = 0) -> None:
    assert proc.returncode == expected, f"exit {proc.returncode}:\n{proc.stdout[-6000:]}"


def lora_logits(base_dir: Path, adapter_dir: Path, weights: dict | None = None):
    """Logits of the 4-bit base + LoRA adapter from adapter_dir (optionally with other LoRA weights loaded)."""
    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quant)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    if weights is not None:
        set_peft_model_state_dict(model, weights)
    ids = torch.arange(1, 33).unsqueeze(0) * 97 % 32000
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_weights(out: Path, steps: int, config: str) -> dict:
    """The trained LoRA weights from the step-`steps` checkpoint, independently of the final save_model()."""
    from safetensors.torch import load_file

    ckpt = out / f"checkpoint-{steps}"
    if "deepspeed" not in config:
        return load_file(ckpt / "adapter_model.safetensors")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), exclude_frozen_parameters=True)
    return {k.replace(".default.", "."): v for k, v in fp32.items()}


@pytest.mark.parametrize("config", ["multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_two_process_qlora_trains_and_saves_full_adapter(config, tiny_args, tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from medtune.checkpoints import find_resume_checkpoint

    steps, out = 8, tmp_path / "out"
    # The end-of-training generation runs too: under ZeRO-3 it needs every rank in each forward pass.
    args = run_args(tiny_args, steps, sample_prompt="I have a cough.", generation_eval_samples=2)
    proc = subprocess.run(launch_cmd(config, args), cwd=ROOT, env=cpu_env(config),
                          capture_output=True, text=True, timeout=300)
    check_ok(proc)
    assert "generation eval on 2 rows" in proc.stderr and "model answer:" in proc.stdout

    logged = losses(out / f"checkpoint-{steps}")
    assert sorted(logged) == list(range(1, steps + 1))
    first, last = logged[1], sum(logged[s] for s in (steps - 1, steps)) / 2
    assert last < first, f"loss did not fall: {logged}"
    assert find_resume_checkpoint(str(out)) == str(out / f"checkpoint-{steps}")

    adapter = load_file(out / "adapter_model.safetensors")
    n_layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(adapter) == 2 * 7 * n_layers  # lora_A + lora_B for all 7 projections of every layer
    assert all(t.numel() > 0 for t in adapter.values()), "empty tensors: ZeRO-3 shards were saved ungathered"
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), "lora_B still zero: no training"

    # The saved adapter is the trained state (rounded to the dtype it was saved in, bf16 under DeepSpeed-CPU) ...
    ref = reference_weights(out, steps, config)
    assert set(ref) == set(adapter)
    for key, saved in adapter.items():
        torch.testing.assert_close(saved, ref[key].to(saved.dtype), rtol=0, atol=0, msg=key)
    # ... and reloads onto the 4-bit base to the trained model's logits (its forward used the saved dtype too).
    reloaded = lora_logits(tiny_model_dir, out)
    trained = lora_logits(tiny_model_dir, out, weights={k: v.to(adapter[k].dtype) for k, v in ref.items()})
    torch.testing.assert_close(reloaded, trained, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(reloaded, lora_logits(tiny_model_dir, out, weights={k: v * 0 for k, v in ref.items()}))


def _worker_pids(launcher_pid: int) -> list[int]:
    import psutil

    kids = psutil.Process(launcher_pid).children(recursive=True)
    return [p.pid for p in kids if any("train.py" in part for part in p.cmdline())]


def test_preempted_run_saves_once_and_resumes_exactly(tiny_args, tmp_path):
    """The reference recipe's strategies (evaluation and a checkpoint per epoch, W&B on, offline), SIGUSR1 to ONE
    rank mid-epoch: both ranks checkpoint at the same step, with no evaluation and exactly one save (not a second
    one at the epoch end that the stop leads to), and exit with EXIT_PREEMPTED (which medtune.training.node_launch
    keeps).
    The resumed run then logs the same per-step losses as an uninterrupted run, and the same final eval loss."""
    from medtune.checkpoints import COMPLETE_MARKER, checkpoints, find_resume_checkpoint, step_of
    from medtune.monitoring import RUN_ID_FILE

    config = "multi_gpu.yaml"
    reference = dict(num_train_epochs=1, max_train_samples=48, max_eval_samples=8, eval_strategy="epoch",
                     save_strategy="epoch", report_to="wandb")

    def launch(out: Path) -> list[str]:  # max_steps -1: the epoch ends the run
        return launch_cmd(config, run_args(tiny_args, -1, output_dir=out, resume="true", **reference),
                          launcher="medtune.training.node_launch")

    straight = tmp_path / "straight"
    check_ok(subprocess.run(launch(straight), cwd=ROOT, env=cpu_env(config), capture_output=True, text=True,
                            timeout=300))
    straight_end = Path(find_resume_checkpoint(straight))

    out = tmp_path / "preempted"
    proc = subprocess.Popen(launch(out), cwd=ROOT, env=cpu_env(config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, log = 0, []
    for line in proc.stdout:  # the Trainer prints one metrics dict per logged step
        log.append(line)
        seen += line.count("'loss'")
        if seen >= 2:
            break
    pids = _worker_pids(proc.pid)
    assert len(pids) == 2, f"expected 2 training processes, found {pids}"
    os.kill(pids[0], signal.SIGUSR1)
    log += proc.stdout.readlines()
    text = "".join(log)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, text[-6000:]
    stop = re.search(r"stop signal \(SIGUSR1\) -> saving checkpoint at step (\d+)", text)
    assert stop, text[-6000:]
    assert "'eval_loss'" not in text[stop.end():], "evaluated after the stop"

    ckpt = Path(find_resume_checkpoint(out))
    stopped_at = step_of(ckpt)
    assert stopped_at == int(stop.group(1)) and 2 <= stopped_at < step_of(straight_end)
    assert checkpoints(out) == [ckpt], "one checkpoint, at the stop"
    marker = (ckpt / COMPLETE_MARKER).stat().st_mtime_ns
    newer = [f.name for f in ckpt.rglob("*") if f.is_file() and f.stat().st_mtime_ns > marker]
    assert not newer, f"written after the completion marker (a second save?): {newer}"
    assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (out / "adapter_model.safetensors").exists(), "a preempted run must skip the final save"

    check_ok(subprocess.run(launch(out), cwd=ROOT, env=cpu_env(config), capture_output=True, text=True,
                            timeout=600))
    end = Path(find_resume_checkpoint(out))
    assert end.name == straight_end.name
    expected, resumed = losses(straight_end), losses(end)
    assert sorted(resumed) == sorted(expected)
    for step in range(stopped_at + 1, step_of(end) + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=RESUME_RTOL), (step, resumed, expected)
    def eval_losses(checkpoint: Path) -> list[float]:
        history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
        return [e["eval_loss"] for e in history if "eval_loss" in e]

    assert len(eval_losses(end)) == 1
    assert eval_losses(end) == pytest.approx(eval_losses(straight_end), rel=RESUME_RTOL)
    assert (end / RUN_ID_FILE).read_text() == (ckpt / RUN_ID_FILE).read_text(), "resumed into another W&B run"


def test_fsdp_qlora_has_one_dtype_per_flat_parameter(tiny_model_dir, monkeypatch):
    """FSDP-QLoRA as the README says: under FSDP the 4-bit weights are stored in the compute dtype (bf16 here, as on
    GPUs), loaded without a device map and nothing is upcast, so torch's FSDP, with peft's wrap policy as
    transformers applies it, flattens every unit into one dtype, and trains. accelerate selects FSDP only on GPUs,
    so FSDP is driven directly here, in one gloo process."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from peft.utils.other import fsdp_auto_wrap_policy
    from trl import get_peft_config

    from medtune.training.config import parse_recipe
    from medtune.training.model import load_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        recipe = parse_recipe(["--config", str(ROOT / "configs/recipes/tiny.yaml"), "--model_name_or_path",
                               str(tiny_model_dir), "--dtype", "bfloat16"])
        base = load_model(recipe)
        assert base.hf_quantizer.quantization_config.bnb_4bit_quant_storage == torch.bfloat16
        assert getattr(base, "hf_device_map", None) is None
        assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
        model = get_peft_model(base, get_peft_config(recipe.model))
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                                           use_orig_params=False, device_id=torch.device("cpu"))
        ids = torch.arange(1, 17).unsqueeze(0)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
    finally:
        dist.destroy_process_group()
