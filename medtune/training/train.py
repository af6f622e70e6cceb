"""QLoRA supervised fine-tuning of a chat model (Starling by default) on MedTuned instructions with TRL's SFTTrainer.

Same entry point for one process, `accelerate launch` (DDP, DeepSpeed ZeRO-2/3, FSDP) and Slurm:

    accelerate launch launch/train.py --config configs/recipes/starling_medtuned.yaml
    python launch/train.py --config configs/recipes/tiny.yaml --max_steps 10
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medtune.training.config import Recipe, recipe_from_command_line

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from medtune.inference.chat_format import ChatFormat
    from medtune.data import PreparedData
    from medtune.eval.during_training import ConsultationEval
    from medtune.inference.generation import Completion
    from medtune.training.preemption import PreemptionCallback

logger = logging.getLogger("medtune")


@dataclass
class TrainResult:
    output_dir: Path
    model: PeftModel
    adapter_path: Path | None
    log_history: list[dict]
    preempted: bool
    sample_answer: Completion | None
    safety_stop: str | None = None  # why the consultation safety gate ended the run


def build_trainer(recipe: Recipe, args: SFTConfig, tokenizer: PreTrainedTokenizerBase, prepared: PreparedData,
                  model: PreTrainedModel, callbacks: list[TrainerCallback]) -> SFTTrainer:
    """TRL's SFTTrainer on the prepared data, with `args` from medtune.training.trainer_arguments."""
    from trl import SFTTrainer, get_peft_config

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        peft_config=get_peft_config(recipe.model),
        callbacks=callbacks,
    )
    if args.deepspeed_plugin is None:
        # TRL stores a quantized model's LoRA weights in bf16. Keep them in fp32 (autocast still computes in
        # fp16/bf16): fp16 AMP needs fp32 master weights, and a resumed optimizer state is cast to the weights'
        # dtype on load, so bf16 weights would round it and a resumed run would drift from an uninterrupted one.
        # DeepSpeed keeps its own fp32 master copy.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def answer_sample(model, fmt: ChatFormat, prompt: str) -> Completion:
    """The trained model's greedy reply to `prompt`, with its finish reason."""
    from medtune.inference.decoding import complete

    model.eval()
    return complete(model, fmt, [[{"role": "user", "content": prompt}]], max_new_tokens=48)[0]


def evaluate_generations(trainer, fmt: ChatFormat, prepared, samples: int) -> None:
    """Score generated replies on eval rows per task family and log them with the training metrics."""
    from medtune.data.select import select_rows
    from medtune.eval.generate import evaluate_model, flat_metrics, headlines

    if (rows := prepared.eval_rows()) is None:
        logger.warning("generation_eval_samples=%d but the recipe has no eval split: skipped", samples)
        return
    rows = select_rows(rows, samples, seed=trainer.args.seed)
    results, _ = evaluate_model(trainer.model, fmt, rows, max_new_tokens=128,
                                batch_size=trainer.args.per_device_eval_batch_size)
    logger.info("generation eval on %d rows: %s; per source and all metrics: eval/gen_* in the logs",
                len(rows), headlines(results))
    trainer.log(flat_metrics(results))


@dataclass
class Run:
    """Everything `train` works with, ready before the first step."""

    fmt: ChatFormat
    prepared: PreparedData
    trainer: SFTTrainer
    resume: str | None  # checkpoint to resume from
    preemption: PreemptionCallback
    consultation: ConsultationEval | None = None  # the consultation and its safety gate (consultation_eval_dataset)


def build_run(recipe: Recipe) -> Run:
    from medtune.checkpoints import find_resume_checkpoint
    from medtune.data import prepare_dataset
    from medtune.training.model import load_chat_format, load_model
    from medtune.monitoring import configure_wandb, monitoring_callbacks, run_info, write_run_info
    from medtune.training.preemption import PreemptionCallback
    from medtune.training.trainer_arguments import resolve_trainer_arguments

    fmt = load_chat_format(recipe)
    # Before the model and before any collective: one process tokenizes, the others wait on a file lock.
    prepared = prepare_dataset(recipe, fmt)
    args, adjustments = resolve_trainer_arguments(recipe, has_eval=prepared.eval is not None)
    resume = find_resume_checkpoint(args.output_dir) if recipe.checkpointing.resume else None
    if recipe.checkpointing.resume:
        logger.info("resuming from %s", resume or "scratch (no complete checkpoint yet)")
    use_wandb = configure_wandb(recipe, resume)
    info = run_info(recipe, prepared, adjustments) if args.process_index == 0 else None
    if info is not None:
        write_run_info(args.output_dir, info)
    # It deletes old checkpoints itself (the recipe's save_total_limit), after the new one is complete.
    preemption = PreemptionCallback(recipe.checkpointing.save_every_minutes, recipe.training.save_total_limit)
    callbacks = [*monitoring_callbacks(recipe, info, use_wandb), preemption]  # preemption last: see its docstring
    consult = None
    if recipe.data.consultation_eval_dataset:  # read before the model loads: a bad file stops the run here
        from medtune.eval.during_training import ConsultationEval, load_vignettes

        d = recipe.data
        consult = ConsultationEval(fmt, load_vignettes(d.consultation_eval_dataset), d.consultation_eval_max_new_tokens,
                                   args.per_device_eval_batch_size, d.safety_regression, d.safety_tolerance)
        callbacks.insert(0, consult)  # the preemption callback stays last
    trainer = build_trainer(recipe, args, fmt.tokenizer, prepared, load_model(recipe), callbacks)
    if consult is not None:
        consult.trainer = trainer
    return Run(fmt, prepared, trainer, resume, preemption, consult)


def save_for_inference(output_dir: Path, fmt: ChatFormat, recipe: Recipe) -> None:
    """What the adapter folder needs beside the adapter so that chat, serving, export and vLLM use the training
    format: the tokenizer with its chat template, a generation_config with every stop id, and the base model as a
    path that holds from any folder."""
    from medtune.adapters import ADAPTER_CONFIG, adapter_config
    from medtune.inference.generation import generation_config

    fmt.tokenizer.save_pretrained(output_dir)
    generation_config(fmt).save_pretrained(output_dir)
    base = Path(recipe.model.model_name_or_path).expanduser()
    if (output_dir / ADAPTER_CONFIG).is_file() and base.exists():
        config = adapter_config(output_dir)
        config["base_model_name_or_path"] = str(base.resolve())
        (output_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def log_cpu_affinity() -> None:
    """Once per rank: the CPUs this process may run on, which Slurm sets per task (srun --cpus-per-task)."""
    from medtune.monitoring import EVERY_RANK

    cpus, allotted = len(os.sched_getaffinity(0)), int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    line = (f"rank {os.environ.get('RANK', '0')} on {platform.node()}: CPU affinity {cpus}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if cpus < allotted:
        line += f", below the job's {allotted} CPUs per task (srun without --cpus-per-task?)"
    logging.getLogger(EVERY_RANK).log(logging.WARNING if cpus < allotted else logging.INFO, line)


def train(recipe: Recipe) -> TrainResult:
    from medtune.training import preemption, stop_signal
    from medtune.export.model_card import write_adapter_card

    stop_signal.listen()  # before data preparation and model loading (launch/train.py does it before any import)
    try:
        log_cpu_affinity()
        run = build_run(recipe)
        fmt, prepared, trainer = run.fmt, run.prepared, run.trainer
        output_dir, device = Path(recipe.training.output_dir), trainer.args.device
        if preemption.stop_requested(device):
            logger.warning("stop signal before the first step: exiting without training")
            return TrainResult(output_dir, trainer.model, None, [], True, None)
        trainer.train(resume_from_checkpoint=run.resume)
        if run.preemption.stopped:
            preemption.requeue_without_batch_shell(trainer.is_world_process_zero())
            # torchrun ends every rank once one exits non-zero: all exit together, after rank 0 has finished W&B.
            trainer.accelerator.wait_for_everyone()
            return TrainResult(output_dir, trainer.model, None, trainer.state.log_history, True, None)
        # save_model gathers ZeRO-3 shards before writing, so the adapter is complete on every launcher.
        trainer.save_model(str(output_dir))
        trainer.save_state()  # trainer_state.json: medtune-report reads it when there is no W&B run
        if trainer.is_world_process_zero():
            save_for_inference(output_dir, fmt, recipe)
            write_adapter_card(output_dir)  # medtune's card over the one TRL's save_model wrote
        adapter = output_dir / "adapter_model.safetensors"
        if preemption.stop_requested(device):
            logger.warning("stop signal after the last step: adapter saved; generation eval and sample answer skipped")
            return TrainResult(output_dir, trainer.model, adapter, trainer.state.log_history, False, None)
        # Every rank generates (same inputs): under ZeRO-3 each forward pass needs the shards of all ranks.
        if recipe.after_training.generation_eval_samples:
            evaluate_generations(trainer, fmt, prepared, recipe.after_training.generation_eval_samples)
        prompt = recipe.after_training.sample_prompt
        answer = answer_sample(trainer.model, fmt, prompt) if prompt else None
        trainer.accelerator.wait_for_everyone()
        return TrainResult(output_dir, trainer.model, adapter, trainer.state.log_history, False, answer,
                           run.consultation.stopped if run.consultation else None)
    finally:
        stop_signal.restore()


def main(argv: list[str] | None = None) -> None:
    from medtune.monitoring import setup_logging
    from medtune.training.preemption import EXIT_PREEMPTED

    recipe = recipe_from_command_line(argv)
    setup_logging(recipe.training)
    result = train(recipe)
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)
    if result.safety_stop:
        sys.exit(f"medtune: {result.safety_stop}. The adapter of that step is in {result.output_dir}; set "
                 "safety_regression: warn to train on regardless.")
    if result.sample_answer is not None and recipe.training.process_index == 0:
        losses = [e["loss"] for e in result.log_history if "loss" in e]
        if losses:
            print(f"loss: first logged {losses[0]:.4f} -> last logged {losses[-1]:.4f}")
        print(f"adapter saved to: {result.adapter_path}")
        answer = result.sample_answer
        print(f"sample question: {recipe.after_training.sample_prompt}")
        print(f"model answer: {answer.text}")
        if answer.finish_reason == "stop":
            print(f"(generation stopped at its end-of-turn token after {answer.completion_tokens} tokens)")
        else:
            print(f"(stopped at the {answer.completion_tokens}-token limit before the end-of-turn token)")


if __name__ == "__main__":
    main()
