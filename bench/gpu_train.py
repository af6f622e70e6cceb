"""GPU QLoRA benchmark: Starling-LM-7B-alpha's exact architecture with random weights, medtune vs the tutorial.

No 14 GB download: the model is MistralConfig(**medtune.tiny.STARLING_CONFIG) built on the meta device, its
tensors filled with random values one at a time on the GPU and written as safetensors shards to --model-dir
(once, ~14.5 GB of disk, reused by later runs); every side then loads it with `from_pretrained(...,
quantization_config=BitsAndBytesConfig(4-bit NF4))`, the same path as the real checkpoint.

Sides, per --seq, alternating, --repeats times in this one process:
  baseline    the tutorial: `text` field, every row padded to seq, micro-batch 4, fp16, paged_adamw_32bit,
              LoRA r8 on all linear layers, gradient checkpointing, library defaults otherwise.
  trl_packed  the same with TRL 1.16's default packing (packing=True, bfd, padding-free).
  medtune     medtune.training.train.build_run: BFD-packed padding-free rows plus the options below.

medtune options (the field's usual ones, each a flag): bf16 (--dtype), SDPA, flex attention or FlashAttention
(--attn), Liger layer kernels: RMSNorm, SwiGLU, RoPE (--liger, default on when liger-kernel is importable), a larger
micro-batch in packed rows (--medtune-batch / --medtune-tokens), TRL's loss_type (--loss), gradient checkpointing
off (--no-checkpointing), packing off for ablation (--no-packing). --sides runs a subset.
Chunked cross-entropy needs no flag: TRL 1.16 always computes the loss through its fused LM head in
chunks, on every side (its `chunked_nll` is an alias of `nll`, and it turns Liger's fused linear CE off).

Reported per side: real (non-padding) tokens/s, step time, MFU, peak GPU memory, and ratios to the baseline.
MFU is the training log's: medtune.monitoring.FlopModel of the side's own model (4N frozen + 6N LoRA + attention
per real token, no recompute, padding counted as waste) over the step time and the device's peak.

    python -m bench.gpu_train --seq 512 2048
    python -m bench.gpu_train --seq 2048 --attn flex_attention --medtune-batch 4 --sides baseline medtune
    python -m bench.gpu_train --model tiny --allow-cpu --seq 128 --steps 3   # code-path check without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import synthetic
from bench._common import ROOT, guarded, interleave, machine, median, print_table, write_json
from bench.training import medtune_trainer, timed_train, tutorial_trainer

SIDES = ("baseline", "trl_packed", "medtune")


def write_random_checkpoint(config: dict, out_dir: Path, shard_bytes: int = 2 << 30) -> Path:
    """Random bf16 weights for `config` as safetensors shards + index + Starling tokenizer. Never holds the whole
    model in memory: shapes come from a meta-device model, tensors are made one by one."""
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    from medtune.tiny import build_starling_tokenizer

    out_dir = Path(out_dir)
    done = out_dir / "model.safetensors.index.json"
    if done.exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = MistralConfig(**config)
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in MistralForCausalLM(cfg).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    cfg.save_pretrained(out_dir)
    build_starling_tokenizer(out_dir)
    total = sum(s.numel() for s in shapes.values()) * 2
    done.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out_dir


def medtune_overrides(args) -> tuple[str, ...]:
    """Recipe keys for the medtune side (on top of configs/recipes/tiny.yaml's QLoRA settings)."""
    return ("--dtype", "auto" if args.dtype != "fp32" else "float32",
            "--bf16", str(args.dtype == "bf16").lower(), "--fp16", str(args.dtype == "fp16").lower(),
            "--attn_implementation", args.attn, "--loss_type", args.loss,
            "--packing", str(not args.no_packing).lower(), "--use_liger_kernel", str(args.liger).lower(),
            "--gradient_checkpointing", str(args.checkpointing).lower())


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _side(label: str, build, warmup: int) -> dict:
    """Build one side's trainer (model load included, timed apart), train it, and print the result at once: a
    7B run takes minutes per side, and a run cut short should still have shown what it measured."""
    import torch

    _release()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(Path(tmp))
        load_s = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # training's peak (resident model included), not the load's
        result = timed_train(trainer, warmup)
        del trainer
    result["load_s"] = load_s
    mem = ""
    if torch.cuda.is_available():
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        mem = f", peak {result['peak_mem_gib']:.1f} GiB"
    _release()
    print(f"{label}: {result['real_tokens_per_s']:.0f} real tokens/s, step {result['step_s']:.3f}s, "
          f"load {load_s:.0f}s{mem}", flush=True)
    return result


def run_seq(seq: int, args, model_dir: Path, data_file: Path, peak: float | None) -> list[dict]:
    from medtune.inference.load import load_tokenizer

    rows = [json.loads(line) for line in data_file.open()]
    tokenizer = load_tokenizer(str(model_dir))
    medtune_batch = args.medtune_batch or max(1, args.medtune_tokens // seq)
    builders = {
        "baseline": lambda out: tutorial_trainer(rows, str(model_dir), tokenizer, out, args.steps,
                                                 args.baseline_batch, seq, packing=False),
        "trl_packed": lambda out: tutorial_trainer(rows, str(model_dir), tokenizer, out, args.steps,
                                                   args.baseline_batch, seq, packing=True),
        "medtune": lambda out: medtune_trainer(data_file, str(model_dir), out, args.steps, medtune_batch, seq,
                                               medtune_overrides(args)),
    }
    sides = {name: guarded(lambda name=name: _side(f"seq {seq} {name}", builders[name], args.warmup))
             for name in args.sides}
    results = interleave(sides, args.repeats)
    ok = {name: runs for name, runs in results.items() if not any("error" in r for r in runs)}
    base = ok.get("baseline")
    table = []
    for name, runs in results.items():
        row = {"seq": seq, "side": name, "micro_batch": medtune_batch if name == "medtune" else args.baseline_batch}
        if name not in ok:
            table.append({**row, "note": next(r["error"] for r in runs if "error" in r)})
            continue
        row.update({key: median(runs, key) for key in ("step_s", "real_tokens_per_s", "slot_efficiency", "load_s")})
        if base:
            row["ratio_tokens"] = row["real_tokens_per_s"] / median(base, "real_tokens_per_s")
        if peak:
            row["mfu"] = median(runs, "model_flops_per_s") / peak
        if "peak_mem_gib" in runs[0]:
            row["peak_mem_gib"] = median(runs, "peak_mem_gib")
            if base:
                row["ratio_mem"] = row["peak_mem_gib"] / median(base, "peak_mem_gib")
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> dict | None:
    import torch

    from medtune.monitoring import peak_flops
    from medtune.tiny import STARLING_CONFIG, TINY_CONFIG

    p = argparse.ArgumentParser(description="GPU QLoRA benchmark on a random Starling-LM-7B-alpha architecture.")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="max_length values to run")
    p.add_argument("--model", choices=["starling", "tiny"], default="starling",
                   help="architecture: Starling-LM-7B-alpha's config, or the tiny one for a code-path check")
    p.add_argument("--model-dir", default=None, help="random checkpoint folder (default .cache/bench/<model>-random)")
    p.add_argument("--rows", type=int, default=20_000, help="synthetic MedTuned-shaped rows")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baseline-batch", type=int, default=4, help="tutorial micro-batch (padded rows)")
    p.add_argument("--medtune-batch", type=int, default=None, help="packed rows per micro-batch (default: "
                   "--medtune-tokens // seq)")
    p.add_argument("--medtune-tokens", type=int, default=4096, help="token slots per medtune micro-batch")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | kernels-community/flash-attn ...")
    p.add_argument("--liger", action=argparse.BooleanOptionalAction, default=None,
                   help="Liger kernels (default: on when liger-kernel is installed)")
    p.add_argument("--loss", choices=["nll", "chunked_nll"], default="nll")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="medtune side: gradient checkpointing (off trades memory for ~1/4 fewer FLOPs)")
    p.add_argument("--no-packing", action="store_true", help="medtune side without packing (ablation)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                   help="sides to run; ratios need baseline")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from its name)")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (code-path check only)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps <= max(args.warmup, 1):
        p.error("--steps must be larger than --warmup (and at least 2)")
    if args.liger is None:
        import importlib.util

        args.liger = importlib.util.find_spec("liger_kernel") is not None
    if not torch.cuda.is_available():
        if not args.allow_cpu:
            sys.exit("no CUDA device: this benchmark needs a GPU (pass --allow-cpu --model tiny for a code check)")
        args.dtype = "fp32"  # medtune.training.trainer_arguments turns mixed precision off on CPU anyway
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (code-path check, not a result)"
    print(f"device: {device}", flush=True)
    config = STARLING_CONFIG if args.model == "starling" else TINY_CONFIG
    model_dir = Path(args.model_dir or ROOT / ".cache/bench" / f"{args.model}-random")
    start = time.perf_counter()
    write_random_checkpoint(config, model_dir)
    print(f"random checkpoint: {model_dir} ({time.perf_counter() - start:.0f}s)", flush=True)
    data_file = synthetic.write_jsonl(args.rows, synthetic.default_path(args.rows), 0)
    # The training log's table of device peaks (medtune.monitoring), so both report MFU against the same peak.
    peak = peak_flops(device if torch.cuda.is_available() else None, args.peak_tflops)
    payload = {"benchmark": "gpu_train", "device": device, "peak_tflops": peak and peak / 1e12, "machine": machine(),
               "args": vars(args), "table": []}
    for seq in args.seq:
        payload["table"] += run_seq(seq, args, model_dir, data_file, peak)
        write_json(args.json, payload)  # after every seq: a run stopped later keeps what it measured
    print(f"steps {args.steps} (first {args.warmup} untimed), repeats {args.repeats} (median); medtune: "
          f"{args.dtype}, attn {args.attn}, liger {args.liger}, loss {args.loss}, packing {not args.no_packing}, "
          f"checkpointing {args.checkpointing}")
    print_table(payload["table"], ["seq", "side", "micro_batch", "step_s", "real_tokens_per_s", "ratio_tokens",
                                   "mfu", "peak_mem_gib", "ratio_mem", "slot_efficiency", "load_s", "note"])
    return payload


if __name__ == "__main__":
    main()
