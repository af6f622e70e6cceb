"""GGUF fidelity: does llama.cpp, running the GGUF files medtune-export writes, answer as transformers does running the
merged model folder they came from?

    make demo && .venv/bin/medtune-export --model outputs/demo --out outputs/demo/export      # a merged model
    python -m bench.gguf_fidelity --model outputs/demo/export
    python -m bench.gguf_fidelity --family starling --max-new-tokens 16     # a tiny random model of the tests

For each GGUF type: whether llama.cpp's own tokenizer gives the training prompt ids (apply_chat_template's) for
every held-out conversation, whether llama.cpp counts the end-of-turn token as an end of generation, and, against
the folder on transformers (fp32), the greedy replies identical token for token, the replies that ended at the
end-of-turn token on each side, the teacher-forced reply loss and the headline metrics. The GGUF files run through
medtune's llama.cpp engine (medtune.inference.llama_cpp), with the prompts' ids checked equal to llama.cpp's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench._common import ROOT, machine, print_table, write_json

HELD_OUT = ROOT / "data/sample/medtuned_sample_eval.jsonl"


def side(model, fmt, rows, max_new_tokens: int) -> dict:
    from medtune.inference.decoding import complete
    from medtune.eval.generate import reply_losses
    from medtune.eval.prompt import row_messages
    from medtune.eval.score import score

    completions = complete(model, fmt, [row_messages(r) for r in rows], max_new_tokens=max_new_tokens)
    replies = [c.text for c in completions]
    results = score(rows, replies, reply_losses(model, fmt, rows, 8))
    return {"replies": replies, "stops": [c.finish_reason == "stop" for c in completions], "results": results}


def llama_cpp_checks(path: Path, fmt, rows) -> dict:
    """llama.cpp's own tokenizer against the training prompt ids (`fmt`: the model folder's chat format); the
    end-of-turn as an end of generation."""
    import llama_cpp
    from llama_cpp import Llama

    from medtune.eval.prompt import row_messages

    vocab_only = Llama(str(path), vocab_only=True, verbose=False)
    same = 0
    for row in rows:
        messages = row_messages(row)
        ids = vocab_only.tokenize(fmt.render(messages, True).encode(), add_bos=False, special=True)
        same += ids == fmt.prompt_ids(messages)
    vocab = llama_cpp.llama_model_get_vocab(vocab_only.model)
    return {"prompt_ids_same": same, "end_of_turn_is_eog": bool(llama_cpp.llama_vocab_is_eog(vocab,
                                                                                              fmt.end_of_turn_id))}


def fidelity(model_dir: Path, rows, types: list[str], out_dir: Path, max_new_tokens: int) -> list[dict]:
    from medtune.export.gguf import write_gguf
    from medtune.inference.load import load_for_inference

    files = write_gguf(model_dir, types, out_dir)
    reference_model, training = load_for_inference(model_dir, device="cpu", dtype="float32")
    reference = side(reference_model, training, rows, max_new_tokens)
    table = [{"form": "transformers fp32", "rows_identical": len(rows), "stopped": sum(reference["stops"]),
              "reply_loss": reference["results"]["overall"]["loss"], **_headlines(reference["results"])}]
    for kind, path in zip(types, files):
        model, fmt = load_for_inference(path, engine="llama.cpp")
        checks = llama_cpp_checks(path, training, rows)
        got = side(model, fmt, rows, max_new_tokens)
        table.append({"form": f"llama.cpp {kind}", "size_mb": round(path.stat().st_size / 2**20, 1),
                      "rows_identical": sum(a == b for a, b in zip(got["replies"], reference["replies"])),
                      "stopped": sum(got["stops"]), "reply_loss": got["results"]["overall"]["loss"],
                      **_headlines(got["results"]), **checks})
        del model
    return table


def _headlines(results: dict) -> dict:
    return {family: round(m[m["primary"]], 3) for family, m in results["families"].items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a merged model folder (medtune-export's output)")
    which.add_argument("--family", help="a tiny random model of a template family of the tests (tests/families.py): "
                                        "starling, chatml, mistral_v3, llama3")
    p.add_argument("--data", default=str(HELD_OUT), help="held-out rows (default: the sample's eval file)")
    p.add_argument("--held-out", type=int, help="use only this many rows (spread over sources)")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench" / "gguf_fidelity"))
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from medtune.data.select import load_rows, select_rows

    rows = select_rows(load_rows(args.data)[0], args.held_out)
    model = args.model
    if args.family:
        from tests.families import build_model

        model = build_model(args.family, Path(args.work_dir) / args.family)
    table = fidelity(Path(model), rows, args.types, Path(args.work_dir), args.max_new_tokens)
    info = machine()
    print(f"{info}\n{model}: {len(rows)} held-out rows, {args.max_new_tokens} greedy new tokens")
    print_table(table, list(dict.fromkeys(k for row in table for k in row)))
    result = {"machine": info, "args": vars(args), "table": table}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
