"""medtune-serve against hostile and careless clients: long stop strings, half-open and idle connections, more
connections than file descriptors, oversized headers, clients that leave mid-request, keys in the URL."""

import json
import logging
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from conftest import free_port
from serve_helpers import LIMITS, local_server, raw_request, read_all, wait_for

from medtune.inference.load import load_for_inference
from medtune.serve.app import ServerSettings
from medtune.serve.connections import ConnectionLimits
from medtune.inference.generation import ReplyText

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "I have a sore throat and a mild fever since yesterday."}]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_for_inference(tiny_model_dir, device="cpu")


@contextmanager
def log_records(*names: str):
    """The records these loggers emit at INFO and above (uvicorn's loggers do not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for logger, level in loggers:
            logger.removeHandler(handler)
            logger.setLevel(level)


# -- stop strings ------------------------------------------------------------------------------------------------

def reference_reply(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[tuple[str, bool]], str]:
    """The plain definition, token by token: cut at the first stop string found; otherwise hold back the longest
    end of the text that starts a stop string (every prefix of every stop string tried: quadratic, but obviously
    right)."""
    held, out = "", []
    for piece in pieces:
        text = held + piece
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            out.append((text[:min(hits)], True))
            return out, ""
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        held = text[len(text) - hold:] if hold else ""
        out.append((text[:len(text) - hold], False))
    return out, held


def _stop_strings(rng: random.Random, text: str) -> tuple[str, ...]:
    """1 to 3 stop strings: pieces of `text`, which occur, or such pieces and a character the text never has, which
    are held back each time the text reaches the piece's end, and released."""
    stops = []
    for _ in range(rng.randrange(1, 4)):
        start = rng.randrange(len(text))
        s = text[start:start + rng.randrange(1, 14)]
        stops.append(s if rng.random() < 0.3 else s + "\u2603")
    return tuple(stops)


def test_stop_strings_are_held_back_and_cut_exactly_as_defined(model_and_tok):
    tok = model_and_tok[1].tokenizer
    rng = random.Random(0)
    texts = [" aaaaaaaaab aaab", " abcabcabd abcabcabcabd", " Rest, rest and rest. Call a doctor, call a doctor!"]
    streams = [tok.encode(t, add_special_tokens=False) for t in texts]
    streams += [[rng.randrange(100, tok.vocab_size) for _ in range(60)] for _ in range(30)]
    outcomes = {"stopped": 0, "ran to the end": 0, "held at the end": 0}
    for ids in streams:
        plain = ReplyText(tok)
        pieces = [plain.add(i)[0] for i in ids]
        for _ in range(12):
            stops = _stop_strings(rng, "".join(pieces))
            reply, got = ReplyText(tok, stops), []
            for i in ids:
                got.append(reply.add(i))
                if got[-1][1]:
                    break
            expected, held = reference_reply(pieces, stops)
            assert got == expected, stops
            assert reply.flush() == held
            outcomes["stopped" if got[-1][1] else "ran to the end"] += 1
            outcomes["held at the end"] += bool(held)
    assert min(outcomes.values()) > 10, outcomes  # every ending is exercised


def test_the_longest_stop_strings_allowed_finish_and_longer_ones_are_refused(model_and_tok):
    with local_server(model_and_tok, ServerSettings(default_max_tokens=8)) as server:  # the default 256 KiB body
        body = {"messages": ASK, "max_tokens": 80, "temperature": 0}
        plain = httpx.post(server.url + CHAT, json=body, timeout=120).json()["choices"][0]["message"]["content"]
        assert len(plain) > 243 and "\u2603" not in plain
        # Each is the reply's own text, so the reply is held back as a possible stop string, and never one.
        hostile = [plain[k:k + 239] + "\u2603" for k in range(4)]
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(httpx.post, server.url + CHAT, json={**body, "stop": hostile}, timeout=300)
            normal = pool.submit(httpx.post, server.url + CHAT, json={"messages": ASK, "max_tokens": 8}, timeout=300)
            assert normal.result().status_code == 200
            assert held.result().json()["choices"][0]["message"]["content"] == plain
        for stop, message in ((["x" * 241], "stop string 0 is 241 characters long; the limit is 240"),
                              (["a"] + ["x" * 60_000] * 3, "stop string 1 is 60000 characters long; the limit is 240")):
            r = httpx.post(server.url + CHAT, json={**body, "stop": stop})
            assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
            assert r.json()["error"]["code"] == "invalid_stop" and r.json()["error"]["message"] == message


# -- connections -------------------------------------------------------------------------------------------------

def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if data:
        sock.sendall(data)
    return sock


def closed_by_server(sock: socket.socket, within: float = 30) -> bytes:
    """What the server sent before closing `sock` (raises socket.timeout if it keeps it open)."""
    return read_all(sock, timeout=within)


def still_open(sock: socket.socket) -> bool:
    sock.settimeout(0.3)
    try:
        return sock.recv(1) != b""
    except socket.timeout:
        return True
    except ConnectionError:
        return False


def error_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


HALF_HEADERS = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
HALF_BODY = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"messages\": ")


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, read whole; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_half_open_and_idle_connections_are_closed_at_their_deadlines(model_and_tok):
    limits = ConnectionLimits(header_timeout=2.0, keep_alive_timeout=3.0)
    settings = ServerSettings(default_max_tokens=8, limits=LIMITS, body_timeout=1.0)
    with local_server(model_and_tok, settings, limits=limits) as server:
        silent = connect(server.port)
        half_headers = connect(server.port, HALF_HEADERS)
        half_body = connect(server.port, HALF_BODY)
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        idle = connect(server.port, request)
        again = connect(server.port, request)
        assert read_response(again).startswith(b"HTTP/1.1 200 ")
        again.sendall(HALF_HEADERS)  # kept alive, then part of a second request

        assert closed_by_server(silent) == b""
        answer = closed_by_server(half_headers)
        assert answer.startswith(b"HTTP/1.1 408 ") and error_body(answer)["code"] == "header_timeout"
        answer = closed_by_server(half_body)
        assert answer.startswith(b"HTTP/1.1 408 ") and error_body(answer)["code"] == "body_timeout"
        assert b"connection: close" in answer.lower()
        answer = closed_by_server(idle)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
        answer = closed_by_server(again)
        assert answer.startswith(b"HTTP/1.1 408 ") and error_body(answer)["code"] == "header_timeout"
        assert httpx.get(server.url + "/health").status_code == 200


def test_past_max_connections_the_longest_waiting_connection_makes_room(model_and_tok):
    with local_server(model_and_tok, limits=ConnectionLimits(max_connections=4)) as server:
        connections = server.server.server_state.connections
        socks = []
        for i, data in enumerate([HALF_HEADERS, HALF_BODY, HALF_HEADERS, b""]):
            socks.append(connect(server.port, data))
            wait_for(lambda n=i + 1: len(connections) == n, what=f"connection {i + 1} to be accepted")
        newcomer = connect(server.port, HALF_HEADERS)  # the fifth: the first, oldest, is closed for it
        assert closed_by_server(socks[0]) == b""
        assert all(still_open(s) for s in socks[1:] + [newcomer])
        assert httpx.get(server.url + "/health").status_code == 200  # the sixth: the half-sent body goes
        assert closed_by_server(socks[1]) == b""
        assert all(still_open(s) for s in socks[2:] + [newcomer])
        for s in socks[2:] + [newcomer]:
            s.close()


def test_past_max_connections_with_every_connection_busy_newcomers_get_503(model_and_tok):
    with local_server(model_and_tok, limits=ConnectionLimits(max_connections=2)) as server:
        batcher = server.backend.batcher
        busy = [raw_request(server.port, {"messages": ASK, "max_tokens": 1500, "stream": True}) for _ in range(2)]
        wait_for(lambda: batcher.running + batcher.waiting == 2, what="both requests to be taken")
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_connections" and r.json()["error"]["type"] == "server_error"
        for s in busy:
            s.close()
        wait_for(lambda: batcher.running + batcher.waiting == 0, what="both to be cancelled")
        wait_for(lambda: len(server.server.server_state.connections) == 0, what="both connections to close")
        assert httpx.get(server.url + "/health").status_code == 200


def test_more_half_open_sockets_than_file_descriptors_do_not_lock_out_health(tiny_model_dir, tmp_path):
    """The issue's case, in a process with `ulimit -n 256` and the default limits: 300 connections that send part
    of their headers or of their body and wait."""
    port, log = free_port(), tmp_path / "server.log"
    command = f"ulimit -n 256 && exec {sys.executable} -m medtune.serve.cli --model {tiny_model_dir} --port {port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", command + " --device cpu"], stdout=out, stderr=subprocess.STDOUT)
    socks = []
    try:
        wait_for(lambda: _health(port) == 200, timeout=180, what="the server to start")
        for i in range(300):
            socks.append(connect(port, HALF_HEADERS if i % 2 else HALF_BODY))
        assert [_health(port) for _ in range(5)] == [200] * 5
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "Too many open files" not in text and "out of system resource" not in text
    assert "connections open (--max-connections 128): closing those that waited longest for their client" in text


def _health(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
    except httpx.TransportError:
        return None


# -- headers, disconnects, keys in the URL ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_and_tok):
    with local_server(model_and_tok) as s:
        yield s


def test_oversized_headers_get_431(server):
    r = httpx.get(server.url + "/health", headers={"X-Big": "a" * 1_000_000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert "over 16384 bytes" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", headers={"X-Fine": "a" * 8000}).status_code == 200


def test_a_client_leaving_while_sending_its_body_is_one_log_line(server):
    with log_records("medtune.serve", "uvicorn.error") as records:
        connect(server.port, HALF_BODY).close()
        wait_for(lambda: records, what="the disconnect to be logged")
        time.sleep(0.5)  # anything else it would log comes now
    assert len(records) == 1 and records[0].levelno == logging.INFO and records[0].exc_info is None
    assert "disconnected while sending POST /v1/chat/completions" in records[0].getMessage()


def test_keys_in_the_url_are_refused_and_query_strings_never_logged(server):
    with log_records("uvicorn.access") as records:
        for query, name in (("api_key=sk-secret-1", "api_key"), ("key=sk-secret-2", "key"),
                            ("x=1&API-KEY=sk-secret-3", "API-KEY"), ("token=sk-secret-4", "token")):
            r = httpx.get(f"{server.url}/v1/models?{query}")
            assert r.status_code == 400 and r.json()["error"]["code"] == "key_in_query"
            assert r.json()["error"]["param"] == name and "Authorization: Bearer" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/health?verbose=sk-secret-5").status_code == 200
        wait_for(lambda: len(records) == 5, what="the access log lines")
    lines = [r.getMessage() for r in records]
    assert not any("secret" in line or "?" in line for line in lines), lines
    assert lines[-1].endswith('"GET /health HTTP/1.1" 200')
