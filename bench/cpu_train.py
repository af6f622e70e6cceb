"""CPU training-step benchmark: medtune vs the tutorial recipe on the tiny Starling-shaped model, per launcher.

Sides (same tiny 4-bit model, LoRA r8 on all linear layers, paged_adamw_32bit, gradient checkpointing, fp32 on CPU,
same micro-batch, same synthetic MedTuned-shaped rows):
  medtune     medtune.training.train.build_run (the training command's own setup): BFD-packed rows, padding-free
              collator (one flattened sequence per micro-batch, position_ids restart per sample).
  baseline    the tutorial: SFTTrainer on a `text` field, packing=False, every row padded to max_length 512.
  trl_packed  the tutorial text with TRL 1.16's own packing (packing=True, strategy bfd, padding-free).

Launchers: `single` (one process) and, for each config present in configs/accelerate/, 2 CPU processes through
`accelerate launch --num_processes 2 --config_file <config>` (ddp: multi_gpu.yaml, zero2/zero3:
deepspeed_zero{2,3}.yaml; OMP_NUM_THREADS=1, and ACCELERATE_USE_CPU=true for DDP). Each launch runs all sides
alternately, --repeats times, in the same processes.

Per side: samples/s (original rows) and real (non-padding) tokens/s per process over the timed steps (after
--warmup steps), the median over repeats, and the ratio to the baseline.

    python -m bench.cpu_train                      # all launchers, 4 steps (1 untimed), 2 repeats, micro-batch 2
    python -m bench.cpu_train --launchers single --steps 20 --warmup 3 --repeats 3 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import synthetic
from bench._common import ROOT, TINY_DIR, guarded, interleave, machine, median, print_table, write_json
from bench.training import medtune_trainer, timed_train, tutorial_trainer

LAUNCH_CONFIGS = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def worker(args) -> None:
    """Runs inside each launched process: every side, alternately, `repeats` times; rank 0 writes the results."""
    import datasets
    import torch
    from accelerate import PartialState

    from medtune.inference.load import load_tokenizer

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
    worker_argv = ["-m", "bench.cpu_train", "--worker", "--out", str(out), "--rows", str(args.rows),
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
