"""Can one request stall the others? A normal request's latency alone and with a hostile request in flight.

    python -m bench.serve_stall --repeats 5 --threads 1

Starts one `medtune-serve` on the tiny model (greedy). The normal request asks for 8 tokens; the long request for
512 (`--long-tokens`), either plain or hostile: 4 stop strings of 240 characters (the API's limit), made of the
long reply's own text and ending in a character it never writes, so that the start of the reply is held back as a
possible stop string, token after token, and no stop string ever matches. Two arrivals, each side run
alternately with the others (interleaved):
- `same batch`: the long and the normal request wait together behind a short blocker request, so they share
  one batch: the normal request pays its share of each step, the hostile stop checks included;
- `arrives later`: the normal request is sent while the long one generates: it joins the long one's batch at the
  next step and shares its forward passes (medtune.serve.batcher); the plain long request is the reference for
  what the stop strings add.
Reports per side the normal request's latency (streamed, to [DONE]) and its decode time (from its first token to
[DONE]: its share of the batch's steps, without the wait for the blocker), medians over the rounds, each as a
ratio to the same arrival's `alone` side, and the long reply's seconds per token; checks that the hostile reply
equals the plain one (no stop string ever matched) and that the issue's stop list (4 strings of 60,000
characters) is refused. A last table times `ReplyText`, the hold-back itself, over the long reply's tokens: no
stop strings, 4 x 240 characters, and the issue's 4 x 60,000 given to it directly (the API refuses them).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time

import httpx
from bench._common import TINY_DIR, interleave, machine, print_table, write_json
from bench.serve_load import free_port, prompt, start_server, wait_ready

NORMAL_TOKENS, BLOCKER_TOKENS = 8, 64
NEVER = "\u2603"  # ends every hostile stop string; checked not to be in the reply
LONG = [{"role": "user", "content": "Explain, step by step and in detail, how to care for a sprained ankle at home."}]


def chat(url: str, messages: list[dict], max_tokens: int, stop: list[str] | None = None) -> tuple[float, dict]:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stop": stop})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()


def stream_timings(url: str, messages: list[dict], max_tokens: int) -> dict:
    """A streamed greedy reply: seconds to [DONE], and from its first token to [DONE] (its steps in a batch)."""
    start, first = time.perf_counter(), None
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content": ""' not in line:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"normal_s": end - start, "normal_decode_s": end - first}


def wait_health(url: str, condition, unless: threading.Thread | None = None) -> bool:
    """Poll /health until `condition` holds (True), or until `unless` has ended or a minute has passed (False)."""
    end = time.monotonic() + 60
    while not condition(httpx.get(url + "/health").json()):
        if time.monotonic() > end or (unless is not None and not unless.is_alive()):
            return False
        time.sleep(0.002)
    return True


def in_background(call) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=call()))
    thread.start()
    return thread, out


def scenario(url: str, long_tokens: int, stop: list[str] | None, long: bool, same_batch: bool, i: int) -> dict:
    """One round: the normal request's latency, and the long reply with its seconds per token."""
    background = []
    if same_batch:  # the blocker generates while the long and the normal request queue up behind it
        background.append(in_background(lambda: chat(url, prompt(1000 + i), BLOCKER_TOKENS)))
        wait_health(url, lambda h: h["running"] == 1)
    if long:
        background.append(in_background(lambda: chat(url, LONG, long_tokens, stop)))
        if not same_batch:
            wait_health(url, lambda h: h["running"] == 1)
    thread, normal = in_background(lambda: stream_timings(url, prompt(i), NORMAL_TOKENS))
    together = wait_health(url, lambda h: h["waiting"] == 1 + long, unless=thread) if same_batch else None
    for t, _ in [*background, (thread, normal)]:
        t.join()
    row = {**normal["result"], "queued_together": together}
    if long:
        long_s, body = background[-1][1]["result"]
        row |= {"long_reply": body["choices"][0]["message"]["content"],
                "long_s_per_token": long_s / body["usage"]["completion_tokens"]}
    return row


def hold_back_cost(model_dir, reply_ids: list[int], stops: dict[str, tuple[str, ...]], repeats: int) -> list[dict]:
    """Seconds per token of ReplyText over the long reply's tokens, per stop list (median of `repeats`)."""
    from medtune.inference.load import load_tokenizer
    from medtune.inference.generation import ReplyText

    tok = load_tokenizer(model_dir)

    def run(stop):
        start = time.perf_counter()
        reply = ReplyText(tok, stop)
        for token in reply_ids:
            reply.add(token)
        return {"s": (time.perf_counter() - start) / len(reply_ids)}

    results = interleave({name: lambda stop=stop: run(stop) for name, stop in stops.items()}, repeats)
    base = statistics.median(r["s"] for r in results["none"])
    return [{"stop strings": name, "us_per_token": 1e6 * statistics.median(r["s"] for r in rs),
             "ratio": statistics.median(r["s"] for r in rs) / base} for name, rs in results.items()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="rounds per side (default: %(default)s)")
    p.add_argument("--long-tokens", type=int, default=512, help="the long reply's length (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from medtune.tiny import build_tiny_model

    model_dir = build_tiny_model(TINY_DIR)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model_dir, port, 8, 8, NORMAL_TOKENS, args.threads)
    try:
        wait_ready(url, proc)
        plain_reply = chat(url, LONG, args.long_tokens)[1]["choices"][0]["message"]["content"]  # also the warm-up
        if len(plain_reply) < 243 or NEVER in plain_reply:
            raise RuntimeError("the long reply cannot carry the hostile stop strings")
        hostile = [plain_reply[k:k + 239] + NEVER for k in range(4)]
        held_60000 = (plain_reply * (60_000 // len(plain_reply) + 1))[:59_999] + NEVER
        refused = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": prompt(0), "max_tokens": NORMAL_TOKENS, "stop": ["x" * 60_000] * 4})  # the list
        info = machine()
        companions = {"alone": (None, False), "with plain long": (None, True), "with hostile long": (hostile, True)}
        sides = {}
        for arrival, same in (("same batch", True), ("arrives later", False)):
            for name, (stop, long) in companions.items():
                sides[(arrival, name)] = functools.partial(scenario, url, args.long_tokens, stop, long, same,
                                                           len(sides))
        rounds = interleave(sides, args.repeats)
    finally:
        proc.terminate()
        proc.wait(30)
    info["load_avg_1m_after"] = machine()["load_avg_1m"]

    rows = []
    for (arrival, name), results in rounds.items():
        row = {"arrival": arrival, "side": name}
        for key in ("normal_s", "normal_decode_s"):  # the latency, and the 7 steps after the first token
            value = statistics.median(r[key] for r in results)
            alone = statistics.median(r[key] for r in rounds[(arrival, "alone")])
            row |= {key.replace("_s", "_ms"): 1000 * value, key.replace("_s", "_ratio"): value / alone}
        if "long_s_per_token" in results[0]:
            row["long_ms_per_token"] = 1000 * statistics.median(r["long_s_per_token"] for r in results)
        rows.append(row)
    same_reply = all(r["long_reply"] == plain_reply for (_, name), rs in rounds.items() if "long" in name
                     for r in rs)
    checks = [r["queued_together"] for (arrival, _), rs in rounds.items() if arrival == "same batch" for r in rs]
    together = f"{sum(checks)} of {len(checks)}"

    from medtune.inference.load import load_tokenizer

    reply_ids = load_tokenizer(model_dir).encode(plain_reply, add_special_tokens=False)
    cost = hold_back_cost(model_dir, reply_ids, {"none": (), "4 x 240": tuple(hostile),
                                                 "4 x 60,000": (held_60000,) * 4}, args.repeats)
    print(f"{info}\nnormal request {NORMAL_TOKENS} tokens, long {args.long_tokens}, median of {args.repeats} rounds")
    print_table(rows, ["arrival", "side", "normal_ms", "normal_ratio", "normal_decode_ms", "normal_decode_ratio",
                       "long_ms_per_token"])
    print(f"hostile reply identical to the plain one: {same_reply}; 'same batch' rounds where the requests were seen "
          f"queued together: {together}; 4 x 60,000-character stop list answered {refused.status_code} "
          f"({refused.json()['error']['message']})")
    print(f"ReplyText over the long reply's {len(reply_ids)} tokens:")
    print_table(cost, ["stop strings", "us_per_token", "ratio"])
    result = {"machine": info, "args": vars(args), "rows": rows, "identical_replies": same_reply,
              "queued_together": together, "issue_stop_list_status": refused.status_code, "hold_back": cost}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
