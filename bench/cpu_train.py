"""CPU training-step benchmark: medtune vs the tutorial recipe on the tiny Starling-shaped model, per launcher.

Sides (same tiny 4-bit model, LoRA r8 on all linear layers, paged_adamw_32bit, gradient checkpointing, fp32 on CPU,
same micro-batch, same synthetic MedTuned-shaped rows):
  medtune     medtune.train.build_run (the training command's own setup): BFD-packed rows, padding-free
              collator (one flattened sequence per micro-batch, position_ids restart per sample).
  baseline    the tutorial: SFTTrainer on a `text` field, packing=False, every row padded to max_length 512.
  trl_packed  the tutorial text with TRL 1.16's own packing (packing=True, strategy bfd, padding-free).

Launchers: `single` (one process) and, for each config present in configs/accelerate/, 2 CPU processes through
`accelerate launch --num_processes 2 --config_file <config>` (ddp: multi_gpu.yaml, zero2/zero3:
deepspeed_zero{2,3}.yaml; OMP_NUM_THREADS=1, and ACCELERATE_USE_CPU=true for DDP). Each launch runs all sides
alternately, --repeats times, in the same processes.

Per side: samples/s (original rows) and real (non-padding) tokens/s per process over the timed steps (after
--warmup steps), the median over repeats, and the ratio to the baseline.

    python bench/cpu_train.py                      # all launchers, 4 steps (1 untimed), 2 repeats, micro-batch 2
    python bench/cpu_train.py --launchers single --steps 20 --warmup 3 --repeats 3 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import (ROOT, TINY_DIR, guarded, interleave, machine, median, medtune_recipe, print_table, tutorial_text,
                     write_json)

import synthetic

LAUNCH_CONFIGS = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CountingCollator:
    """Wraps a collator to record, per micro-batch: real tokens, original samples, token slots and the sum of
    squared sample lengths (for attention FLOPs), counted as the training log counts them."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[tuple[int, int, int, int]] = []

    def __call__(self, features):
        from medtune.monitoring import batch_counts

        batch = self.inner(features)
        ids = batch["input_ids"]
        real, samples, squares = batch_counts(ids, batch.get("attention_mask"), batch.get("position_ids")).tolist()
        self.batches.append((int(real), int(samples), ids.numel(), int(squares)))
        return batch


def timed_train(trainer, warmup: int) -> dict:
    """Train, timing the steps after `warmup`: throughput and the model FLOP/s of medtune's FLOP model (MFU is that
    over the device's peak)."""
    import torch
    from transformers import TrainerCallback

    from medtune.monitoring import FlopModel

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # kernels are queued asynchronously; time their completion
            ends.append(time.perf_counter())

    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(StepClock())
    trainer.train()
    warmup = max(warmup, 1)  # the first step's clock starts at the end of the previous one
    timed = counter.batches[warmup:len(ends)]  # the i-th collated batch is the i-th trained one (GA 1)
    seconds = ends[-1] - ends[warmup - 1]
    real, samples, slots, squares = (sum(b[i] for b in timed) for i in range(4))
    return {"step_s": seconds / len(timed), "samples_per_s": samples / seconds, "real_tokens_per_s": real / seconds,
            "slot_efficiency": real / slots, "steps": len(ends),
            "model_flops_per_s": FlopModel.from_model(trainer.model).batch(real, squares) / seconds}


def _gloo() -> bool:
    """Multi-process on CPU: the launchers need the gloo backend (DeepSpeed would otherwise ask for NCCL)."""
    import torch

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1


def _common_args(out: Path, steps: int, batch: int) -> dict:
    import torch

    return dict(output_dir=str(out), ddp_backend="gloo" if _gloo() else None, max_steps=steps,
                per_device_train_batch_size=batch, gradient_accumulation_steps=1, optim="paged_adamw_32bit",
                learning_rate=2e-4, gradient_checkpointing=True, fp16=torch.cuda.is_available(), bf16=False,
                logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none", seed=42,
                disable_tqdm=True)


def tutorial_model(model_dir: str):
    """The tutorial's model: 4-bit NF4 + double quant, prepare_model_for_kbit_training, defaults otherwise."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map=device_map)
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model)


def tutorial_trainer(rows: list[dict], model_dir: str, tokenizer, out: Path, steps: int, batch: int,
                     max_length: int, packing: bool, model=None):
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_list([{"text": tutorial_text(r)} for r in rows])
    args = SFTConfig(**_common_args(out, steps, batch), dataset_text_field="text", max_length=max_length,
                     packing=packing, pad_to_multiple_of=None if packing else max_length)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return SFTTrainer(model=model or tutorial_model(model_dir), args=args, train_dataset=dataset,
                      processing_class=tokenizer, peft_config=lora)


def medtune_trainer(data_file: Path, model_dir: str, out: Path, steps: int, batch: int, max_length: int,
                    overrides: tuple[str, ...] = ()):
    from medtune.train import build_run

    recipe = medtune_recipe(
        data_file, model_dir, ROOT / ".cache/bench/data", out, max_length,
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--logging_steps", "10000", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--learning_rate", "2e-4", "--disable_tqdm", "true", "--sample_prompt", "",
        *(["--ddp_backend", "gloo"] if _gloo() else []), *overrides,
    )
    return build_run(recipe).trainer


def worker(args) -> None:
    """Runs inside each launched process: every side, alternately, `repeats` times; rank 0 writes the results."""
    import datasets
    import torch
    from accelerate import PartialState

    from medtune.model import load_tokenizer

    datasets.disable_progress_bars()
    state = PartialState()
    data_file = synthetic.default_path(args.rows, args.seed)
    rows = [json.loads(line) for line in data_file.open()]
    tokenizer = load_tokenizer(args.model_dir)
    torch.manual_seed(0)

    def side(build):
        def run() -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                return timed_train(build(Path(tmp)), args.warmup)
        return guarded(run)

    sides = {
        "baseline": side(lambda out: tutorial_trainer(rows, args.model_dir, tokenizer, out, args.steps,
                                                      args.batch, args.max_length, packing=False)),
        "medtune": side(lambda out: medtune_trainer(data_file, args.model_dir, out, args.steps, args.batch,
                                                    args.max_length)),
    }
    if not args.no_trl_packed:
        sides["trl_packed"] = side(lambda out: tutorial_trainer(rows, args.model_dir, tokenizer, out, args.steps,
                                                                args.batch, args.max_length, packing=True))
    results = interleave({k: v for k, v in sides.items() if k in args.sides}, args.repeats)
    if state.is_main_process:
        write_json(args.out, {"world_size": state.num_processes, "threads": torch.get_num_threads(),
                              "results": results})


def launch(name: str, args) -> dict:
    """Start one launcher's worker processes; returns their results or the error that stopped them."""
    out = ROOT / ".cache/bench" / f"cpu_train_{name}.json"
    out.unlink(missing_ok=True)
    worker_argv = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--rows", str(args.rows),
                   "--seed", str(args.seed), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats), "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--model-dir", args.model_dir, "--sides", *args.sides]
    worker_argv += ["--no-trl-packed"] if args.no_trl_packed else []
    if name == "single":
        cmd = [sys.executable] + worker_argv
    else:
        config = ROOT / "configs/accelerate" / LAUNCH_CONFIGS[name]
        if not config.exists():
            return {"error": f"{config.relative_to(ROOT)} not present"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0"] + worker_argv
    # One thread per process on a CPU launch. DDP needs accelerate's CPU switch (not --cpu, which falls back to
    # one process); DeepSpeed finds its CPU accelerator itself, and the switch would turn DeepSpeed off.
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if name != "single" else None
    if name == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(out.read_text())


def summarize(name: str, result: dict) -> list[dict]:
    if "error" in result:
        return [{"launcher": name, "side": "-", "note": result["error"]}]
    res = result["results"]
    ok = "baseline" in res and not any("error" in r for r in res["baseline"])
    base = median(res["baseline"], "real_tokens_per_s") if ok else float("nan")
    base_samples = median(res["baseline"], "samples_per_s") if ok else float("nan")
    rows = []
    for side, runs in res.items():
        if any("error" in r for r in runs):
            rows.append({"launcher": name, "procs": result["world_size"], "side": side,
                         "note": next(r["error"] for r in runs if "error" in r)})
            continue
        tps, sps = median(runs, "real_tokens_per_s"), median(runs, "samples_per_s")
        rows.append({"launcher": name, "procs": result["world_size"], "side": side,
                     "step_s": median(runs, "step_s"), "samples_per_s": sps, "real_tokens_per_s": tps,
                     "slot_efficiency": median(runs, "slot_efficiency"), "ratio_tokens": tps / base,
                     "ratio_samples": sps / base_samples})
    return rows


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description="CPU training-step benchmark: medtune vs the tutorial recipe.")
    p.add_argument("--launchers", nargs="+", default=["single", "ddp", "zero2", "zero3"],
                   choices=["single", *LAUNCH_CONFIGS])
    p.add_argument("--rows", type=int, default=2000, help="synthetic rows to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per side and repeat")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing (at least 1)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="micro-batch (rows of max_length slots) per process")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--no-trl-packed", action="store_true", help="skip the TRL default-packing baseline row")
    p.add_argument("--sides", nargs="+", default=["baseline", "medtune", "trl_packed"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=str(TINY_DIR))
    p.add_argument("--timeout", type=int, default=900, help="seconds per launcher")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps <= max(args.warmup, 1):
        p.error("--steps must be larger than --warmup (and at least 2)")
    if args.worker:
        return worker(args)

    from medtune.tiny import build_tiny_model

    build_tiny_model(args.model_dir)
    synthetic.write_jsonl(args.rows, synthetic.default_path(args.rows, args.seed), args.seed)
    results = {name: launch(name, args) for name in args.launchers}
    table = [row for name, res in results.items() for row in summarize(name, res)]
    payload = {"benchmark": "cpu_train", "machine": machine(), "args": vars(args), "table": table, "raw": results}
    print(f"machine: {payload['machine']}")
    print(f"steps {args.steps} (first {args.warmup} untimed), repeats {args.repeats} (median), micro-batch "
          f"{args.batch}, max_length {args.max_length}, {args.rows} synthetic rows")
    print_table(table, ["launcher", "procs", "side", "step_s", "samples_per_s", "real_tokens_per_s",
                        "slot_efficiency", "ratio_tokens", "ratio_samples", "note"])
    for name, res in results.items():
        if "log_tail" in res:
            print(f"--- {name} failed:", *res["log_tail"], sep="\n")
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
