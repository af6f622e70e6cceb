"""medtune-serve on GGUF files through llama.cpp against medtune-serve on the merged model through transformers (fp32),
on CPU, side by side: generated tokens/s and time to first token at 1 and 8 concurrent users, and peak memory.

    make demo && make local          # the tuned SmolLM2 and its q8_0 GGUF; llama-cpp-python
    .venv/bin/medtune-export --model outputs/demo/export --out outputs/demo/export --gguf q4_k_m
    python -m bench.serve_gguf --model outputs/demo/export

One server per side (`--model FOLDER` on transformers, `--model model-q8_0.gguf` and `model-q4_k_m.gguf` on
llama.cpp), all started first and idle while another runs its round, with the page's features on: the default
system prompt, triage, streaming (requests as the page sends them). Each round: `--users` clients, each sending
`--requests` streamed greedy chat requests one after the other; time to first token is from sending to the first
content chunk. Rounds alternate between the sides (rotating order); medians over the rounds. Peak memory is the
server process's VmHWM after all rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from bench._common import interleave, machine, print_table, write_json
from bench.serve_load import free_port, prompt, start_server, wait_ready


def round_trip(url: str, users: int, requests: int, max_tokens: int) -> dict:
    ttft, tokens = [], []

    def user(u: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {"messages": prompt(u * requests + r), "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                sent, first = time.perf_counter(), None
                with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - sent
                        if chunk.get("usage"):
                            tokens.append(chunk["usage"]["completion_tokens"])
                ttft.append(first if first is not None else float("nan"))

    start = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        list(pool.map(user, range(users)))
    seconds = time.perf_counter() - start
    return {"tokens_per_s": sum(tokens) / seconds, "ttft_s": statistics.median(ttft)}


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the merged model folder, with model-<type>.gguf files in it")
    p.add_argument("--types", nargs="+", default=["q8_0", "q4_k_m"], help="GGUF types to serve (default: %(default)s)")
    p.add_argument("--users", nargs="+", type=int, default=[1, 8])
    p.add_argument("--requests", type=int, default=2, help="requests per user per round (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="rounds per side and user count (default: %(default)s)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    folder = Path(args.model)
    sides = {"transformers fp32": folder, **{f"llama.cpp {t}": folder / f"model-{t}.gguf" for t in args.types}}
    for name, path in sides.items():
        if not path.exists():
            raise SystemExit(f"{path}: missing (medtune-export --gguf {name.split()[-1]})")
    servers = {}
    try:
        for name, path in sides.items():
            port = free_port()
            proc = start_server(path, port, max(args.users), max(args.users), args.max_tokens, None)
            servers[name] = (f"http://127.0.0.1:{port}", proc)
            wait_ready(servers[name][0], proc)
            round_trip(servers[name][0], 1, 1, args.max_tokens)  # warm-up, not timed
        info = machine()
        rows = []
        for users in args.users:
            rounds = interleave({name: lambda url=url, users=users: round_trip(url, users, args.requests,
                                                                                 args.max_tokens)
                                 for name, (url, _) in servers.items()}, args.repeats)
            for name, results in rounds.items():
                rows.append({"side": name, "users": users,
                             "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                             "ttft_s": statistics.median(r["ttft_s"] for r in results)})
        peak = {name: peak_memory_mb(proc.pid) for name, (_, proc) in servers.items()}
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)
    for row in rows:
        base = next(r for r in rows if r["users"] == row["users"] and r["side"] == "transformers fp32")
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["peak_memory_mb"] = peak[row["side"]]
        row["memory_ratio"] = peak[row["side"]] / peak["transformers fp32"]
    print(f"{info}\n{folder}: {args.requests} streamed requests per user per round, {args.max_tokens} greedy tokens, "
          f"median of {args.repeats} rounds")
    print_table(rows, ["side", "users", "tokens_per_s", "ttft_s", "speedup", "peak_memory_mb", "memory_ratio"])
    result = {"machine": info, "args": vars(args), "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
