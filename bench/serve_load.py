"""Chat-server throughput under concurrent load: dynamic batching against one request at a time.

    python -m bench.serve_load --clients 16 --requests 64 --max-tokens 32 --repeats 3

Starts two `medtune-serve` processes on the tiny model, one with `--max-batch-size B` (default 8) and one with
`--max-batch-size 1`, then runs rounds alternately on each (the order rotates every round; the other server sits
idle): `--clients` concurrent clients send `--requests` greedy chat requests between them, each waiting for its
reply before sending the next. Reports requests/s and generated tokens/s per side (median over the rounds), the
ratio batched / one-at-a-time, and whether both sides gave the same greedy replies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from bench._common import TINY_DIR, interleave, machine, median, print_table, write_json

SYMPTOMS = ["a sore throat", "a dry cough", "a headache behind the eyes", "a swollen ankle", "an itchy rash",
            "heartburn after meals", "a blocked nose", "back pain when lifting"]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: I have had {SYMPTOMS[i % len(SYMPTOMS)]} for "
                                        f"{i % 6 + 1} days. What can I do at home, and when should I see a doctor?"}]


def start_server(model_dir, port: int, max_batch_size: int, clients: int, max_tokens: int,
                 threads: int | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.Popen(
        [sys.executable, "-m", "medtune.serve.cli", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
         "--max-batch-size", str(max_batch_size), "--max-queue", str(2 * clients), "--temperature", "0",
         "--max-tokens", str(max_tokens)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"medtune-serve for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError(f"medtune-serve at {url} did not start")


def load_round(url: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    """`requests` chat requests from `clients` concurrent clients; wall time, tokens and the replies."""
    ids = itertools.count()
    replies: dict[int, str] = {}
    tokens = [0] * clients

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            while (i := next(ids)) < requests:
                body = {"messages": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                        "stream_options": {"include_usage": True} if stream else None}
                r = http.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                if stream:
                    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
                    replies[i] = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
                    tokens[c] += chunks[-1]["usage"]["completion_tokens"]
                else:
                    body = r.json()
                    replies[i] = body["choices"][0]["message"]["content"]
                    tokens[c] += body["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_s": requests / seconds, "tokens_per_s": sum(tokens) / seconds,
            "replies": [replies[i] for i in range(requests)]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per round (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length (greedy, so every reply runs to it "
                                                              "unless the model ends its turn)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="rounds per side (default: %(default)s)")
    p.add_argument("--stream", action="store_true", help="streamed replies instead of plain ones")
    p.add_argument("--threads", type=int, help="torch CPU threads per server (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from medtune.tiny import build_tiny_model

    model_dir = build_tiny_model(TINY_DIR)
    sizes = {"batched": args.max_batch_size, "one_at_a_time": 1}
    servers = {}
    try:
        for name, size in sizes.items():
            port = free_port()
            servers[name] = (f"http://127.0.0.1:{port}", start_server(model_dir, port, size, args.clients,
                                                                       args.max_tokens, args.threads))
        for url, proc in servers.values():
            wait_ready(url, proc)
            load_round(url, args.clients, args.clients, args.max_tokens, args.stream)  # warm-up, not timed
        info = machine()
        rounds = interleave({name: lambda url=url: load_round(url, args.clients, args.requests, args.max_tokens,
                                                              args.stream)
                             for name, (url, _) in servers.items()}, args.repeats)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)
    info["load_avg_1m_after"] = machine()["load_avg_1m"]

    rows = []
    for name, results in rounds.items():
        rows.append({"side": name, "max_batch_size": sizes[name], "requests_per_s": median(results, "requests_per_s"),
                     "tokens_per_s": median(results, "tokens_per_s"), "seconds": median(results, "seconds")})
    base = rows[1]["requests_per_s"]
    for row in rows:
        row["ratio"] = row["requests_per_s"] / base
    same = all(a["replies"] == b["replies"] for a, b in zip(rounds["batched"], rounds["one_at_a_time"]))
    print(f"{info}\n{args.clients} clients, {args.requests} requests per round, {args.max_tokens} tokens each, "
          f"{'streamed' if args.stream else 'plain'}, median of {args.repeats} rounds per side")
    print_table(rows, ["side", "max_batch_size", "requests_per_s", "tokens_per_s", "seconds", "ratio"])
    print(f"greedy replies identical on both sides: {same}")
    result = {"machine": info, "args": vars(args), "rows": rows, "identical_replies": same}
    write_json(args.json, result)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
