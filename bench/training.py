"""The training sides both training benchmarks run (cpu_train, gpu_train): the tutorial's trainer, medtune's own,
and the clock and counters around `trainer.train()`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench._common import ROOT, medtune_recipe, tutorial_text


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


def _training_args(out: Path, steps: int, batch: int) -> dict:
    import torch

    return dict(output_dir=str(out), ddp_backend="gloo" if _gloo() else None, max_steps=steps,
                per_device_train_batch_size=batch, gradient_accumulation_steps=1, optim="paged_adamw_32bit",
                learning_rate=2e-4, gradient_checkpointing=True, fp16=torch.cuda.is_available(), bf16=False,
                logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none", seed=42,
                disable_tqdm=True)


def tutorial_model(model_dir: str, gradient_checkpointing: bool = True):
    """The tutorial's model: 4-bit NF4 + double quant, prepare_model_for_kbit_training, defaults otherwise."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from medtune.inference.quantization import fp32_on_cpu

    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map=device_map)
    model.config.use_cache = False
    fp32_on_cpu(model)  # evaluated on the same CPU path as medtune's model (medtune.inference.quantization.fp32_on_cpu)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def tutorial_trainer(rows: list[dict], model_dir: str, tokenizer, out: Path, steps: int, batch: int,
                     max_length: int, packing: bool, model=None):
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from medtune.training.arguments import ALL_LINEAR

    dataset = datasets.Dataset.from_list([{"text": tutorial_text(r)} for r in rows])
    args = SFTConfig(**_training_args(out, steps, batch), dataset_text_field="text", max_length=max_length,
                     packing=packing, pad_to_multiple_of=None if packing else max_length)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    return SFTTrainer(model=model or tutorial_model(model_dir), args=args, train_dataset=dataset,
                      processing_class=tokenizer, peft_config=lora)


def medtune_trainer(data_file: Path, model_dir: str, out: Path, steps: int, batch: int, max_length: int,
                    overrides: tuple[str, ...] = ()):
    from medtune.training.train import build_run

    recipe = medtune_recipe(
        data_file, model_dir, ROOT / ".cache/bench/data", out, max_length,
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--logging_steps", "10000", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--learning_rate", "2e-4", "--disable_tqdm", "true", "--sample_prompt", "",
        *(["--ddp_backend", "gloo"] if _gloo() else []), *overrides,
    )
    return build_run(recipe).trainer
