"""Dynamic batching in medtune-serve: same greedy replies as one at a time, slow readers, disconnects, limits."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import LIMITS, local_server, raw_request, read_all, wait_for

import torch

from medtune.inference.decoding import DecodeBatch, new_batch
from medtune.inference.generation import Sampling
from medtune.export.gguf import write_gguf
from medtune.inference.load import load_for_inference
from medtune.serve.app import ServerSettings
from medtune.inference.generation import ReplyText

CHAT = "/v1/chat/completions"
PROMPTS = [[{"role": "user", "content": f"Patient {i}: " + "dizzy and tired, " * (i % 5) + "what should I do?"}]
           for i in range(16)]


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def model_and_tok(request, tiny_model_dir, tmp_path_factory):
    """The tiny model on each engine: its folder on transformers, its f16 GGUF file on llama.cpp (room for all 16
    prompts at once)."""
    if request.param == "transformers":
        return load_for_inference(tiny_model_dir, device="cpu")
    (path,) = write_gguf(tiny_model_dir, ["f16"], tmp_path_factory.mktemp("gguf"))
    return load_for_inference(path, engine="llama.cpp", max_sequences=16)


def decode(model, fmt, conversations, max_new, samplings=None, drop_after=None):
    """Tokens per row from the model's decoding batch; `drop_after` = {row: n} makes a row leave the batch after n
    tokens."""
    prompts = [fmt.prompt_ids(c) for c in conversations]
    batch = new_batch(model, fmt, prompts, samplings or [Sampling()] * len(prompts), [max_new] * len(prompts))
    out = [[] for _ in prompts]
    while batch.rows:
        tokens = batch.sample()
        for row, t in zip(batch.rows, tokens):
            out[row].append(t)
        keep = [len(out[r]) < (drop_after or {}).get(r, max_new) for r in batch.rows]
        batch.advance(tokens, keep)
    return out


def hf_generate(model, fmt, conversation, max_new_tokens):
    """transformers' own greedy generate under the same rules (min_new_tokens=1, the format's stop ids)."""
    prompt = torch.tensor([fmt.prompt_ids(conversation)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         min_new_tokens=1, do_sample=False, eos_token_id=list(fmt.stop_ids))
    return out[0, prompt.shape[1]:].tolist()


def test_decode_batch_greedy_equals_one_at_a_time_and_generate(model_and_tok):
    model, fmt = model_and_tok
    batched = decode(model, fmt, PROMPTS, 12)
    single = [decode(model, fmt, [c], 12)[0] for c in PROMPTS]
    assert batched == single  # fp32, left padding: padding never changes a greedy token
    assert len({tuple(t) for t in batched}) > 8  # different prompts, different replies: no leaks between rows
    if not hasattr(model, "generate"):  # llama.cpp
        return
    for c, tokens in zip(PROMPTS[:3], single):
        assert hf_generate(model, fmt, c, 12) == tokens


def test_rows_leaving_and_sampled_rows_do_not_change_greedy_rows(model_and_tok):
    model, fmt = model_and_tok
    reference = decode(model, fmt, PROMPTS[:4], 10)
    samplings = [Sampling(), Sampling(temperature=1.0, top_p=0.9), Sampling(), Sampling(temperature=0.7)]
    mixed = decode(model, fmt, PROMPTS[:4], 10, samplings, drop_after={0: 3, 1: 5})
    assert mixed[0] == reference[0][:3] and len(mixed[1]) == 5
    assert mixed[2] == reference[2] and len(mixed[3]) == 10


def join_and_leave(model, fmt) -> tuple[dict, dict]:
    """Newcomers join between steps (shorter and longer prompts than the running rows, a shared system prompt
    prefix among them), rows leave (the longest-running first, so the padding of gone rows is cut): each row's greedy
    tokens, and each row's tokens alone."""
    system = {"role": "system", "content": "You are a careful medical assistant. " * 6}
    convs = [PROMPTS[4], [system, *PROMPTS[0]], [system, *PROMPTS[9]], PROMPTS[2], PROMPTS[13]]
    stop_after = {0: 8, 1: 14, 2: 5, 3: 14, 4: 14}
    single = {r: decode(model, fmt, [c], 14)[0][:stop_after[r]] for r, c in enumerate(convs)}
    prompts = [fmt.prompt_ids(c) for c in convs]
    arrivals = {0: [0], 3: [1, 2], 6: [3], 9: [4]}  # step -> rows that join before it
    batch, order, out, step = None, [], {}, 0
    while step == 0 or batch.rows:
        if rows := arrivals.get(step):
            newcomers = new_batch(model, fmt, [prompts[r] for r in rows], [Sampling()] * len(rows), [14] * len(rows))
            if batch is None:
                batch = newcomers
            else:
                batch.join(newcomers)
            order += rows
        tokens = batch.sample()
        for r, t in zip(batch.rows, tokens):
            out.setdefault(order[r], []).append(t)
        batch.advance(tokens, [len(out[order[r]]) < stop_after[order[r]] for r in batch.rows])
        step += 1
    batch.close()
    assert len(batch.rows) == 0 and batch.size == 5
    return out, single


def test_rows_that_join_a_running_batch_get_the_replies_of_one_at_a_time(model_and_tok):
    out, single = join_and_leave(*model_and_tok)
    assert out == single


@pytest.mark.parametrize("window", [24, 512])
def test_joining_and_leaving_rows_keep_their_replies_under_a_sliding_window(tiny_model_dir, window):
    """Starling's layers attend over a sliding window (transformers keeps a count of each layer's tokens): rows that
    join and leave keep their replies, past the window (24) and within it (512, where gone rows' padding is cut)."""
    from transformers import AutoModelForCausalLM

    from medtune.inference.chat_format import ChatFormat
    from medtune.inference.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, sliding_window=window).eval()
    assert hasattr(DecodeBatch(model, ChatFormat(load_tokenizer(tiny_model_dir)), [[1, 2]], [Sampling()]).cache
                   .layers[0], "cumulative_length")  # transformers made sliding-window layers
    out, single = join_and_leave(model, ChatFormat(load_tokenizer(tiny_model_dir)))
    assert out == single


def test_reply_text_holds_back_a_stop_string_until_it_is_decided(model_and_tok):
    tok = model_and_tok[1].tokenizer
    ids = tok.encode(" Rest and drink fluids. Call a doctor if it gets worse.", add_special_tokens=False)
    full = tok.decode(ids)
    reply, pieces = ReplyText(tok, stop=("Call a",)), []
    for i in ids:
        text, stopped = reply.add(i)
        pieces.append(text)
        if stopped:
            break
    assert stopped and "".join(pieces) == full[:full.index("Call a")]  # the pieces join to decode(ids)
    assert all("Call" not in p for p in pieces)
    free = ReplyText(tok, stop=("Doctor!",))
    assert "".join(free.add(i)[0] for i in ids) + free.flush() == full


def ask(url, messages, stream=False, **options):
    body = {"messages": messages, "temperature": 0, "stream": stream, **options}
    r = httpx.post(url + CHAT, json=body, timeout=300)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    assert r.text.rstrip().endswith("data: [DONE]")
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


def test_sixteen_concurrent_greedy_clients_get_the_replies_of_one_at_a_time(model_and_tok):
    options = [dict(max_tokens=6 + i % 7, stop=["zz"] if i % 4 == 0 else None) for i in range(16)]
    with local_server(model_and_tok, max_batch_size=8) as server:
        with ThreadPoolExecutor(16) as pool:
            batched = list(pool.map(lambda i: ask(server.url, PROMPTS[i], i % 2 == 1, **options[i]), range(16)))
        stats = server.backend.batcher.stats
        assert stats["largest_batch"] > 1  # requests really shared forward passes
    with local_server(model_and_tok, max_batch_size=1) as server:
        single = [ask(server.url, PROMPTS[i], **options[i]) for i in range(16)]
        assert server.backend.batcher.stats["largest_batch"] == 1
    assert batched == single


@pytest.fixture(scope="module")
def server(model_and_tok):
    with local_server(model_and_tok, sndbuf=4096) as s:
        yield s


def test_a_client_that_stops_reading_does_not_hold_the_model(server):
    batcher = server.backend.batcher
    finished = batcher.stats["finished"]
    # ~800 chunks of ~190 bytes: far more than the socket buffers and uvicorn's 64 KiB write buffer hold.
    stalled = raw_request(server.port, {"messages": PROMPTS[0], "stream": True, "max_tokens": 800, "temperature": 0},
                          rcvbuf=1024)
    try:
        wait_for(lambda: batcher.running == 1, what="the stalled stream to start generating")
        with ThreadPoolExecutor(4) as pool:  # others are served meanwhile
            assert all(pool.map(lambda i: ask(server.url, PROMPTS[i], max_tokens=8), range(1, 5)))
        wait_for(lambda: batcher.stats["finished"] == finished + 5 and batcher.running == 0,
                 what="the stalled stream's generation to finish while nothing of it is read")
        received = read_all(stalled).decode()  # raw HTTP/1.1, chunked
    finally:
        stalled.close()
    assert "data: [DONE]" in received[-100:] and received.count('"content"') > 700


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_stops_generation(server, stream):
    batcher = server.backend.batcher
    before = dict(batcher.stats)
    sock = raw_request(server.port, {"messages": PROMPTS[1], "max_tokens": 1500, "stream": stream})
    wait_for(lambda: batcher.running == 1, what="generation to start")
    sock.close()
    wait_for(lambda: batcher.running == 0, what="generation to stop")
    assert batcher.stats["cancelled"] == before["cancelled"] + 1
    assert batcher.stats["finished"] == before["finished"]
    assert batcher.stats["tokens"] - before["tokens"] < 1500  # stopped part way


def test_full_queue_answers_503_with_retry_after(model_and_tok):
    with local_server(model_and_tok, max_batch_size=1, max_queue=1) as server:
        batcher = server.backend.batcher
        running = raw_request(server.port, {"messages": PROMPTS[2], "max_tokens": 1500})
        wait_for(lambda: batcher.running == 1, what="the first request to run")
        waiting = raw_request(server.port, {"messages": PROMPTS[3], "max_tokens": 1500})
        wait_for(lambda: batcher.waiting == 1, what="the second request to queue")
        r = httpx.post(server.url + CHAT, json={"messages": PROMPTS[4], "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
        waiting.close()
        running.close()
        wait_for(lambda: batcher.running == 0 and batcher.waiting == 0, what="both to be cancelled")
        assert ask(server.url, PROMPTS[4], max_tokens=2)  # served again


def test_request_timeout(model_and_tok):
    settings = ServerSettings(default_max_tokens=8, limits=LIMITS, request_timeout=0.5)
    with local_server(model_and_tok, settings) as server:
        body = {"messages": PROMPTS[5], "max_tokens": 1500}
        r = httpx.post(server.url + CHAT, json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        streamed = httpx.post(server.url + CHAT, json={**body, "stream": True}, timeout=60).text
        assert '"code": "timeout"' in streamed.split("\n\n")[-2] and "[DONE]" not in streamed
        batcher = server.backend.batcher
        wait_for(lambda: batcher.running == 0, what="the timed-out rows to leave the batch")
        assert batcher.stats["finished"] == 0



def test_a_newcomer_that_fails_to_join_fails_alone(model_and_tok, monkeypatch):
    """Joining can fail (out of memory for the padded cache): the newcomer gets the error, the running reply goes on
    to the end, the same as alone."""
    from medtune.inference.llama_cpp import LlamaCppBatch

    body = {"messages": PROMPTS[3], "max_tokens": 600, "temperature": 0}
    with local_server(model_and_tok) as server:
        alone = httpx.post(server.url + CHAT, json=body, timeout=120).json()["choices"][0]["message"]["content"]

        def fail(self, other):
            raise RuntimeError("out of memory")

        for cls in (DecodeBatch, LlamaCppBatch):
            monkeypatch.setattr(cls, "join", fail)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, server.url + CHAT, json=body, timeout=120)
            wait_for(lambda: server.backend.batcher.running == 1, what="the long reply to start")
            newcomer = httpx.post(server.url + CHAT, json={**body, "max_tokens": 4}, timeout=60)
            assert newcomer.status_code == 500 and "out of memory" in newcomer.json()["error"]["message"]
            assert running.result().json()["choices"][0]["message"]["content"] == alone


def test_decode_batch_runs_a_lora_adapter_on_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.inference.load import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)  # random, not a no-op
    get_peft_model(base, lora).save_pretrained(tmp_path)
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path)
    model, fmt = load_for_inference(tmp_path, device="cpu")  # an adapter folder, as medtune-serve --model loads it
    (tokens,) = decode(model, fmt, PROMPTS[:1], 8)
    assert tokens == hf_generate(model, fmt, PROMPTS[:1][0], 8)


@pytest.mark.slow
def test_serve_load_benchmark_code_path(tmp_path):
    """bench/serve_load.py at tiny sizes: both servers, both sides, the comparison of replies (no timing)."""
    from bench import serve_load

    out = tmp_path / "serve_load.json"
    result = serve_load.main(["--clients", "2", "--requests", "3", "--max-tokens", "2", "--repeats", "1",
                              "--stream", "--json", str(out)])
    assert [r["side"] for r in result["rows"]] == ["batched", "one_at_a_time"]
    assert result["identical_replies"] and json.loads(out.read_text())["rows"][1]["ratio"] == 1.0
    assert all(row["client_cpu_ms"] > 0 and "server_cpu_ms" in row for row in result["rows"])


@pytest.mark.slow
def test_serve_stall_benchmark_code_path(tmp_path):
    """bench/serve_stall.py at tiny sizes: every side ran, the hostile reply is the plain one, the issue's stop list
    is refused (no timing)."""
    from bench import serve_stall

    result = serve_stall.main(["--repeats", "1", "--long-tokens", "64", "--json", str(tmp_path / "stall.json")])
    assert [(r["arrival"], r["side"]) for r in result["rows"]] == [
        (arrival, side) for arrival in ("same batch", "arrives later")
        for side in ("alone", "with plain long", "with hostile long")]
    assert result["identical_replies"] and result["issue_stop_list_status"] == 400
    assert [r["stop strings"] for r in result["hold_back"]] == ["none", "4 x 240", "4 x 60,000"]
