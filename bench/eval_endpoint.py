"""Evaluation throughput: `medtune-eval --endpoint` against one medtune-serve, next to local batched generation.

    python -m bench.eval_endpoint --rows 48 --max-new-tokens 32 --concurrency 1 4 8 --repeats 3

One `medtune-serve --max-batch-size B` (default 8, no system prompt) serves `--model` (default: the tiny model);
the same model is loaded in this process too. Sides, run alternately (the order rotates every round; the idle side
waits): `local`, medtune-eval's own local generation (`generate_replies`, greedy, batches of `--batch-size`), and
`endpoint_cN`, medtune-eval's endpoint generation (`medtune.eval.endpoint.generate`, N requests in flight, replies
written to a fresh eval_predictions.jsonl) for each N of --concurrency. Reports rows/s per side (the median over
the rounds, and the slowest and fastest round), the ratio to local, and whether each side's replies equal local's
row for row. Generation only: local evaluation also computes the reply losses, which an endpoint cannot, and both
sides score alike.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from bench._common import ROOT, TINY_DIR, interleave, machine, median, print_table, write_json
from bench.serve_load import free_port, wait_ready

SAMPLE_EVAL = ROOT / "data" / "sample" / "medtuned_sample_eval.jsonl"


def start_server(model: str, port: int, max_batch_size: int, device: str, threads: int | None) -> subprocess.Popen:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "medtune.serve.cli", "--model", model, "--port", str(port), "--device", device,
         "--max-batch-size", str(max_batch_size), "--system-prompt", "", "--max-queue", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def local_round(model, fmt, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    from medtune.eval.generate import generate_replies

    start = time.perf_counter()
    replies = generate_replies(model, fmt, rows, max_new_tokens, batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows_per_s": len(rows) / seconds, "replies": replies}


def endpoint_round(endpoint, rows: list[dict], max_new_tokens: int, concurrency: int) -> dict:
    from medtune.eval.endpoint import generate
    from medtune.eval.predictions import key

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        outcome = generate({"prediction": endpoint}, rows, rows, out, concurrency, max_new_tokens, max_attempts=6,
                           resume=False)
        seconds = time.perf_counter() - start
    replies = outcome.replies["prediction"]
    return {"seconds": seconds, "rows_per_s": len(rows) / seconds, "failed": len(outcome.failed),
            "replies": [replies.get(key(row)) for row in rows]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the tiny demo model, built on first use)")
    p.add_argument("--data", default=str(SAMPLE_EVAL), help="held-out rows (default: the bundled sample)")
    p.add_argument("--rows", type=int, default=48, help="rows per round, spread over the sources (default: 48)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="endpoint sides (default: 1 4 8)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the server's (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="local generation's (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per side (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads, here and in the server (default: torch's)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    import torch

    from medtune.eval.endpoint import connect
    from medtune.data.select import load_rows, select_rows
    from medtune.inference.load import load_for_inference
    from medtune.tiny import build_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = str(args.model or build_tiny_model(TINY_DIR))
    rows = select_rows(load_rows(args.data)[0], args.rows)
    model, fmt = load_for_inference(model_dir, device=args.device)
    port = free_port()
    server = start_server(model_dir, port, args.max_batch_size, args.device, args.threads)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        endpoint = connect(f"http://127.0.0.1:{port}/v1", None, None)
        sides = {"local": lambda: local_round(model, fmt, rows, args.max_new_tokens, args.batch_size)}
        for n in args.concurrency:
            sides[f"endpoint_c{n}"] = lambda n=n: endpoint_round(endpoint, rows, args.max_new_tokens, n)
        for run in sides.values():  # warm-up, not timed (the first forward passes are slow on either side)
            run()
        info = machine()
        rounds = interleave(sides, args.repeats)
    finally:
        server.terminate()
        server.wait(30)
    info["load_avg_1m_after"] = machine()["load_avg_1m"]

    reference = [r["replies"] for r in rounds["local"]]
    table = []
    for name, results in rounds.items():
        speeds = [r["rows_per_s"] for r in results]
        table.append({"side": name, "rows_per_s": median(results, "rows_per_s"), "min": min(speeds),
                      "max": max(speeds), "seconds": median(results, "seconds"),
                      "failed": sum(r.get("failed", 0) for r in results),
                      "same_as_local": all(r["replies"] == reference[0] for r in results)})
    base = table[0]["rows_per_s"]
    for row in table:
        row["ratio"] = row["rows_per_s"] / base
    print(f"{info}\n{model_dir}: {len(rows)} rows per round, {args.max_new_tokens} new tokens, server "
          f"--max-batch-size {args.max_batch_size}, local batches of {args.batch_size}, median of {args.repeats}")
    print_table(table, ["side", "rows_per_s", "min", "max", "seconds", "ratio", "failed", "same_as_local"])
    result = {"machine": info, "args": vars(args), "rows": table}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
