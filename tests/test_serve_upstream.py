"""`--upstream` (medtune-serve in front of another OpenAI-compatible server), `--print-vllm-command`, the CLI checks."""

import json
import shlex

import httpx
import openai
import pytest
from serve_helpers import LIMITS, LocalServer, local_server, raw_request, wait_for

from medtune.inference.load import load_for_inference
from medtune.serve import cli
from medtune.serve.app import ServerSettings, create_app
from medtune.serve.upstream import UpstreamBackend

UPSTREAM_KEY, FRONT_KEY = "sk-upstream-key", "sk-front-key"
ASK = [{"role": "user", "content": "I have had a mild headache since this morning."}]
EMERGENCY = [{"role": "user", "content": "My face is drooping on one side and my speech is slurred."}]


@pytest.fixture(scope="module")
def upstream(tiny_model_dir):
    model_and_tok = load_for_inference(tiny_model_dir, device="cpu")
    settings = ServerSettings(default_max_tokens=8, limits=LIMITS, api_key=UPSTREAM_KEY)
    with local_server(model_and_tok, settings, max_model_len=512) as s:
        yield s


def front_server(url: str, key: str = UPSTREAM_KEY, request_timeout: float = 300.0, **backend_kwargs) -> LocalServer:
    settings = ServerSettings(default_max_tokens=8, limits=LIMITS, api_key=FRONT_KEY, request_timeout=request_timeout)
    return LocalServer(create_app(UpstreamBackend(url, key, **backend_kwargs), settings))


@pytest.fixture(scope="module")
def front(upstream):
    with front_server(upstream.url + "/v1") as s:
        yield s


def client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_front_serves_the_upstream_model_with_triage(front, upstream):
    direct, via = client(upstream, UPSTREAM_KEY), client(front, FRONT_KEY)
    assert [m.model_dump() for m in via.models.list()] == [m.model_dump() for m in direct.models.list()]
    kwargs = dict(model="tiny-starling", messages=ASK, max_tokens=8, temperature=0)
    expected = direct.chat.completions.create(**kwargs).choices[0].message.content
    assert via.chat.completions.create(**kwargs).choices[0].message.content == expected
    streamed = via.chat.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    with pytest.raises(openai.AuthenticationError):  # the front asks for its own key, not the upstream's
        client(front, UPSTREAM_KEY).models.list()

    headers = {"Authorization": f"Bearer {FRONT_KEY}"}
    plain = httpx.post(front.url + "/v1/chat/completions", json={"messages": EMERGENCY}, headers=headers).json()
    assert plain["triage"]["level"] == "emergency" and plain["model"] == "tiny-starling"
    with httpx.stream("POST", front.url + "/v1/chat/completions", headers=headers,
                      json={"messages": EMERGENCY, "stream": True}) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert json.loads(events[0][6:])["triage"] == plain["triage"] and events[-1] == "data: [DONE]"


def test_upstream_errors_pass_through_as_openai_errors(front):
    headers = {"Authorization": f"Bearer {FRONT_KEY}"}
    long = [{"role": "user", "content": "word " * 390}] * 2  # over the upstream's 512-token context
    r = httpx.post(front.url + "/v1/chat/completions", json={"messages": long}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(front.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 5000}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # the front's own limits


@pytest.mark.parametrize("url, key, status", [("http://127.0.0.1:9/v1", UPSTREAM_KEY, 502), (None, "wrong", 502)])
def test_unreachable_or_refusing_upstream_gives_502(upstream, url, key, status):
    with front_server(url or upstream.url + "/v1", key, model="tiny-starling") as front:
        r = httpx.post(front.url + "/v1/chat/completions", json={"messages": ASK},
                       headers={"Authorization": f"Bearer {FRONT_KEY}"})
    assert r.status_code == status and r.json()["error"]["type"] == "server_error"


def test_disconnect_at_the_front_stops_the_upstream_generation(front, upstream):
    batcher = upstream.backend.batcher
    before = dict(batcher.stats)
    sock = raw_request(front.port, {"messages": ASK, "max_tokens": 300},
                       headers=f"Authorization: Bearer {FRONT_KEY}\r\n")
    wait_for(lambda: batcher.running == 1, what="the upstream to start generating")
    sock.close()
    wait_for(lambda: batcher.running == 0, what="the upstream to stop")
    assert batcher.stats["cancelled"] == before["cancelled"] + 1 and batcher.stats["finished"] == before["finished"]
    assert front.backend.health()["in_flight"] == 0


def test_request_timeout_at_the_front_ends_an_upstream_stream(upstream):
    batcher = upstream.backend.batcher
    before = dict(batcher.stats)
    with front_server(upstream.url + "/v1", request_timeout=0.3) as front:
        # Nearly the upstream's whole context (512): longer than 0.3 s on any CPU.
        streamed = httpx.post(front.url + "/v1/chat/completions", timeout=60,
                              json={"messages": ASK, "max_tokens": 360, "stream": True},
                              headers={"Authorization": f"Bearer {FRONT_KEY}"}).text
        assert streamed.startswith("data: {")  # the upstream's stream had begun
        assert '"code": "timeout"' in streamed.split("\n\n")[-2] and "[DONE]" not in streamed
        wait_for(lambda: batcher.running == 0, what="the upstream to stop")
        assert batcher.stats["cancelled"] == before["cancelled"] + 1
        assert front.backend.health()["in_flight"] == 0


def test_print_vllm_command_for_merged_model_and_adapter(tiny_model_dir, tmp_path, capsys):
    cli.main(["--model", str(tiny_model_dir), "--print-vllm-command", "--max-model-len", "4096"])
    out = capsys.readouterr().out
    merged = shlex.split(next(line for line in out.splitlines() if line.startswith("vllm serve")))
    assert merged[:3] == ["vllm", "serve", str(tiny_model_dir.resolve())]
    assert "--chat-template" not in merged  # vLLM renders with the folder's own template, the trained one
    assert merged[merged.index("--generation-config") + 1] == str(tiny_model_dir.resolve())
    assert merged[merged.index("--max-model-len") + 1] == "4096"
    assert "VLLM_API_KEY" in out and "--api-key" not in merged  # no secret on a command line
    assert f"--upstream http://<gpu-machine>:8000/v1 --upstream-model {tiny_model_dir.resolve().name}" in out

    adapter = tmp_path / "adjusted_model"
    adapter.mkdir()
    config = {"base_model_name_or_path": "berkeley-nest/Starling-LM-7B-alpha", "r": 12, "peft_type": "LORA"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    cli.main(["--model", str(adapter), "--print-vllm-command"])
    args = shlex.split(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vllm serve")))
    assert args[:3] == ["vllm", "serve", "berkeley-nest/Starling-LM-7B-alpha"] and "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == f"adjusted_model={adapter}"
    assert args[args.index("--max-lora-rank") + 1] == "16"  # vLLM accepts 1, 8, 16, 32, ...: the next one up
    assert args[args.index("--tokenizer") + 1] == str(adapter) and "--chat-template" not in args
    assert "--generation-config" not in args  # this adapter folder has none
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    cli.main(["--model", str(adapter), "--print-vllm-command"])
    out = capsys.readouterr().out
    args = shlex.split(next(line for line in out.splitlines() if line.startswith("vllm serve")))
    assert args[args.index("--generation-config") + 1] == str(adapter)  # its stop ids, written by training
    assert "trained on a quantised base" not in out
    (adapter / "run_info.json").write_text(json.dumps({"recipe": {"model": {"load_in_4bit": True}}}))
    cli.main(["--model", str(adapter), "--print-vllm-command"])
    assert "# This adapter was trained on a quantised base; vLLM adds it to the original weights" in (
        capsys.readouterr().out)


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--print-vllm-command"], "needs --model"),
    (["--upstream", "http://x/v1", "--model", "m"], "leave out --model"),
    (["--header-timeout", "0"], "--header-timeout must be positive"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--max-connections", "200"], "--max-connections 200 (accepting up to 100 more at once) needs 300 open files, "
                                   "and this process may open 256 (ulimit -n)"),
])
def test_cli_refuses_unsafe_or_contradictory_settings(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MEDTUNE_API_KEY", raising=False)
    monkeypatch.setattr(cli.resource, "getrlimit", lambda _: (256, 256))
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_the_users_openai_account_is_not_sent_to_other_servers(monkeypatch):
    """The openai client adds OPENAI_ORG_ID / OPENAI_PROJECT_ID as headers; medtune's clients (medtune-eval
    --endpoint, medtune-serve --upstream) talk to other servers and leave them out."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medtune.eval.endpoint import connect
    from medtune.serve.upstream import UpstreamBackend

    seen = []

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(dict(self.headers))
            body = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("OPENAI_ORG_ID", "org-private")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-private")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        assert connect(url, None, None).model == "m"

        async def upstream_models():
            backend = UpstreamBackend(url)
            await backend.start()
            try:
                return await backend.models()
            finally:
                await backend.close()

        assert asyncio.run(upstream_models())[0]["id"] == "m"
    finally:
        server.shutdown()
    assert len(seen) == 2
    assert not [h for headers in seen for h in headers if h.lower() in ("openai-organization", "openai-project")]
