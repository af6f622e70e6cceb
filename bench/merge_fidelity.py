"""Merge fidelity: does the exported model answer as the adapter it came from? Greedy replies to the held-out rows
from four forms of one trained adapter, their exact-match rates against each other, and each one's headline
metrics and held-out reply loss.

    python launch/train.py --config configs/recipes/demo.yaml     # or make demo
    python -m bench.merge_fidelity --adapter outputs/demo

The forms:
- `adapter_4bit`: the adapter on the NF4 base it was trained on (the recipe's BitsAndBytesConfig);
- `adapter`: the adapter on the base's weights as training saw them, quantised as then and de-quantised (what
  medtune-eval, medtune-chat and medtune-serve load; medtune.inference.load.load_base);
- `adapter_original`: the adapter on the base's original weights (`--adapter-base original`; what loading the
  adapter on its base with peft, or vLLM's `--enable-lora`, gives);
- `merged`: `adapter` merged in memory in the export dtype (what medtune-export writes);
- `exported`: the folder medtune-export wrote, reloaded by transformers' AutoModelForCausalLM.
LoRA is trained against the de-quantised NF4 weights; added to the original weights instead it corrects an error
that is not there (peft#2321 is the same mismatch for a merge into 4-bit weights). `adapter` against
`adapter_4bit` measures the round trip (the same weights: only float summation order may differ), `adapter_original`
against them what skipping it costs, and `merged` against `exported` must be exact (same weights, saved and
reloaded).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from bench._common import ROOT, machine, print_table, write_json

HELD_OUT = ROOT / "data/sample/medtuned_sample_eval.jsonl"
FORMS = ("adapter_4bit", "adapter", "adapter_original", "merged", "exported")


def load_form(form: str, adapter: Path, recipe, export_dir: Path, dtype: str):
    """(model, chat format) of one form of the adapter, on CPU in eval mode."""
    from peft import PeftModel

    from medtune.inference.chat_format import ChatFormat
    from medtune.export.merge import export
    from medtune.inference.load import load_for_inference, load_tokenizer, load_weights, resolve_dtype
    from medtune.training.model import load_model

    if form in ("adapter", "adapter_original"):
        return load_for_inference(adapter, device="cpu", as_trained=form == "adapter")
    if form == "exported":
        export(adapter, export_dir, dtype=dtype)
        return load_for_inference(export_dir, device="cpu", dtype=dtype)
    if form == "adapter_4bit":  # the base as training loads it (the recipe's 4-bit settings)
        model = PeftModel.from_pretrained(load_model(recipe), str(adapter))
    else:
        model = load_weights(adapter, resolve_dtype(dtype)).merge_and_unload()
    return model.eval(), ChatFormat(load_tokenizer(adapter), eos_token_id=model.generation_config.eos_token_id)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default=str(ROOT / "outputs" / "demo"), help="a trained adapter folder")
    p.add_argument("--recipe", default=str(ROOT / "configs/recipes/demo.yaml"),
                   help="the recipe it was trained with (its 4-bit settings; default: demo)")
    p.add_argument("--data", default=str(HELD_OUT), help="held-out rows (default: the sample's eval file)")
    p.add_argument("--held-out", type=int, help="use only this many rows (spread over sources)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="medtune-export's --dtype (default: %(default)s)")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench" / "merge_fidelity"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch

    from medtune.adapters import adapter_base
    from medtune.training.config import parse_recipe
    from medtune.data.select import load_rows, select_rows
    from medtune.eval.generate import evaluate_model

    adapter = Path(args.adapter)
    recipe = parse_recipe(["--config", args.recipe, "--model_name_or_path", adapter_base(adapter)])
    rows = select_rows(load_rows(args.data)[0], args.held_out)
    replies, results = {}, {}
    for form in args.forms:
        print(f"{form}: greedy replies to {len(rows)} rows", flush=True)
        model, fmt = load_form(form, adapter, recipe, Path(args.work_dir) / "exported", args.dtype)
        with torch.inference_mode():
            results[form], replies[form] = evaluate_model(model, fmt, rows, args.max_new_tokens, batch_size=32)
        del model
    agreement = [{"a": a, "b": b, "exact_match": sum(x == y for x, y in zip(replies[a], replies[b])) / len(rows)}
                 for a, b in itertools.combinations(args.forms, 2)]
    table = [{"form": f, "reply_loss": results[f]["overall"]["loss"],
              **{fam: m[m["primary"]] for fam, m in results[f]["families"].items()}} for f in args.forms]
    info = machine()
    print(f"{info}\n{len(rows)} held-out rows, {args.max_new_tokens} new tokens, export dtype {args.dtype}")
    print_table(table, list(table[0]))
    print_table(agreement, ["a", "b", "exact_match"])
    result = {"machine": info, "args": vars(args), "table": table, "agreement": agreement, "replies": replies}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
