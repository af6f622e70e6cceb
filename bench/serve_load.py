"""Chat-server throughput under concurrent load: dynamic batching against one request at a time.

    python -m bench.serve_load --clients 16 --requests 64 --max-tokens 32 --repeats 3

Starts two `medtune-serve` processes on the tiny model, one with `--max-batch-size B` (default 8) and one with
`--max-batch-size 1`, then runs rounds alternately on each (the order rotates every round; the other server sits
idle): `--clients` concurrent clients send `--requests` greedy chat requests between them, each waiting for its
reply before sending the next. Reports requests/s and generated tokens/s per side (median over the rounds), the
ratio batched / one-at-a-time, whether both sides gave the same greedy replies, and the CPU time per request of
each server and of the clients (all share the machine's cores).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import psutil
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


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU time so far of process `pid`, in clock ticks (10 ms); of this process without a pid, in
    microseconds (a short round's clients take less than a tick)."""
    if pid is None:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def load_round(url: str, server_pid: int, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    """`requests` chat requests from `clients` concurrent clients; wall time, tokens, the replies, and the CPU time
    per request of the clients and of the server.

    Each client is the standard library's HTTP client on a keep-alive connection: the clients share the server's
    cores, and httpx.Client in 16 threads took about 10 ms of CPU per request here (0.3 ms this way), a fifth of the
    two cores at the batched server's rate, taken from the side that serves more requests per second."""
    address = urlsplit(url)
    ids = itertools.count()
    replies: dict[int, str] = {}
    tokens = [0] * clients

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
        try:
            while (i := next(ids)) < requests:
                body = {"messages": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                        "stream_options": {"include_usage": True} if stream else None}
                conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
                response = conn.getresponse()
                text = response.read().decode()
                if response.status != 200:
                    raise RuntimeError(f"request {i}: HTTP {response.status}: {text[:200]}")
                if stream:
                    chunks = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
                    replies[i] = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
                    tokens[c] += chunks[-1]["usage"]["completion_tokens"]
                else:
                    reply = json.loads(text)
                    replies[i] = reply["choices"][0]["message"]["content"]
                    tokens[c] += reply["usage"]["completion_tokens"]
        finally:
            conn.close()

    server_cpu, own_cpu, start = cpu_seconds(server_pid), cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "requests_per_s": requests / seconds, "tokens_per_s": sum(tokens) / seconds,
            "server_cpu_ms": 1e3 * (cpu_seconds(server_pid) - server_cpu) / requests,
            "client_cpu_ms": 1e3 * (cpu_seconds() - own_cpu) / requests,
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
            load_round(url, proc.pid, args.clients, args.clients, args.max_tokens, args.stream)  # warm-up, not timed
        info = machine()
        rounds = interleave({name: lambda url=url, pid=proc.pid: load_round(url, pid, args.clients, args.requests,
                                                                            args.max_tokens, args.stream)
                             for name, (url, proc) in servers.items()}, args.repeats)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)
    info["load_avg_1m_after"] = machine()["load_avg_1m"]

    rows = []
    for name, results in rounds.items():
        rows.append({"side": name, "max_batch_size": sizes[name], "requests_per_s": median(results, "requests_per_s"),
                     "tokens_per_s": median(results, "tokens_per_s"), "seconds": median(results, "seconds"),
                     "server_cpu_ms": median(results, "server_cpu_ms"),
                     "client_cpu_ms": median(results, "client_cpu_ms")})
    base = rows[1]["requests_per_s"]
    for row in rows:
        row["ratio"] = row["requests_per_s"] / base
    same = all(a["replies"] == b["replies"] for a, b in zip(rounds["batched"], rounds["one_at_a_time"]))
    print(f"{info}\n{args.clients} clients, {args.requests} requests per round, {args.max_tokens} tokens each, "
          f"{'streamed' if args.stream else 'plain'}, median of {args.repeats} rounds per side")
    print_table(rows, ["side", "max_batch_size", "requests_per_s", "tokens_per_s", "seconds", "server_cpu_ms",
                       "client_cpu_ms", "ratio"])
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
