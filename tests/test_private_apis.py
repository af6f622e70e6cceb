"""The private APIs medtune still uses, called as medtune calls them: when a library changes one, the test that fails
names the library and what medtune relies on."""

from __future__ import annotations

import asyncio
import importlib

import h11
import pytest
import uvicorn

from medtune.training.config import _Parser


def _private(module: str, name: str, relied_on: str):
    """`module.name`, or a failure naming it and what medtune relies on it for."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{module}.{name} is gone ({err}); {relied_on}")


def test_argparse_option_string_actions_give_each_keys_nargs():
    """medtune.training.config: several values for a key argparse gives one value (report_to) are given as the list."""
    actions = getattr(_Parser(None), "_option_string_actions", {})
    assert {"--report_to", "--lora_target_modules"} <= set(actions), (
        "argparse: ArgumentParser._option_string_actions no longer maps option strings to actions; "
        "medtune.training.config "
        "reads a key's nargs there")
    assert actions["--report_to"].nargs is None and actions["--lora_target_modules"].nargs == "+", (
        "argparse/TrlParser: report_to no longer takes one value or lora_target_modules several; "
        "medtune.training.config "
        "gives report_to's several values as the list only for a key that takes one")


def test_trl_parse_args_and_config_goes_through_medtunes_hooks(tmp_path, monkeypatch):
    """medtune.training.config's checks live in the two methods TrlParser.parse_args_and_config calls."""
    calls = []

    class Spy(_Parser):
        def set_defaults_with_config(self, **config):
            calls.append(("recipe", config))
            return super().set_defaults_with_config(**config)

        def parse_known_args(self, args=None, namespace=None):
            calls.append(("command line", args))
            return super().parse_known_args(args, namespace)

    monkeypatch.setenv("MEDTUNE_PIN", "0")  # restored after the test
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("env:\n  MEDTUNE_PIN: '1'\nlora_r: 4\nbf16: false\n")
    parsed = Spy(str(recipe)).parse_args_and_config(["--config", str(recipe), "--lora_alpha", "8"])
    assert [c[0] for c in calls] == ["recipe", "command line"] and calls[0][1] == {"lora_r": 4, "bf16": False}, (
        f"trl: TrlParser.parse_args_and_config no longer calls set_defaults_with_config with the recipe's values "
        f"(its env block taken out), then parse_known_args with the command line ({calls}); medtune.training.config "
        f"checks "
        "the recipe and the command line there")
    assert "--lora_alpha" in calls[1][1] and "--config" not in calls[1][1]
    model = parsed[1]
    assert (model.lora_r, model.lora_alpha) == (4, 8), "trl: the recipe's values are no longer the defaults"


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_transformers_compile_jinja_template_renders_as_apply_chat_template(tokenizer):
    """medtune.inference.chat_format renders with the compiled template; medtune.training.config reports its syntax "
    "errors."""
    from jinja2 import TemplateSyntaxError

    _compile_jinja_template = _private("transformers.utils.chat_template_utils", "_compile_jinja_template",
                                       "medtune.inference.chat_format renders chat templates with it")

    messages = [{"role": "user", "content": "Fever for 3 days?"}, {"role": "assistant", "content": "See a GP."},
                {"role": "user", "content": "Thanks"}]
    rendered = _compile_jinja_template(tokenizer.chat_template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=True, **tokenizer.special_tokens_map)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected, (
        "transformers: _compile_jinja_template(template).render(messages=, tools=, documents=, "
        "add_generation_prompt=, **special_tokens_map) no longer matches apply_chat_template(tokenize=False); "
        "medtune.inference.chat_format renders training and serving prompts with it")
    with pytest.raises(TemplateSyntaxError) as err:
        _compile_jinja_template("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    assert err.value.lineno == 2, (
        "transformers: _compile_jinja_template no longer raises jinja2's TemplateSyntaxError with the line; "
        "medtune.training.config names it for a broken chat_template")


def test_transformers_get_control_tokens_are_special_and_template_tokens(tokenizer):
    """medtune.inference.chat_format encodes these as text when a message spells them (sanitize_control_tokens)."""
    assert hasattr(tokenizer, "_get_control_tokens"), (
        "transformers: tokenizers no longer have _get_control_tokens; medtune.inference.chat_format reads the tokens "
        "to keep as "
        "text in messages from it")
    tokenizer.add_tokens(["<|turn|>", "<|unused|>"])
    template = "{% for m in messages %}<|turn|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    controls = set(tokenizer._get_control_tokens(template))
    assert {tokenizer.eos_token, tokenizer.bos_token, "<|turn|>"} <= controls and "<|unused|>" not in controls, (
        f"transformers: tokenizer._get_control_tokens(template) no longer gives the special tokens and the added "
        f"tokens the template writes (got {sorted(controls)}); medtune.inference.chat_format keeps exactly these as "
        f"text in "
        "messages")


def test_wandb_read_netrc_auth_finds_a_stored_key(tmp_path, monkeypatch):
    """medtune.monitoring.wandb_run: a stored login means an online run; none means offline."""
    read_netrc_auth = _private("wandb.sdk.lib.wbauth.wbnetrc", "read_netrc_auth",
                               "medtune.monitoring.wandb_run reads the stored login with it")
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    key = "k" * 40
    assert read_netrc_auth(host="https://api.wandb.ai") is None, "wandb: read_netrc_auth found a key without netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    netrc.chmod(0o600)
    assert read_netrc_auth(host="https://api.wandb.ai") == key, (
        "wandb: read_netrc_auth(host=URL) no longer returns the key stored for the host in $NETRC; medtune.monitoring."
        "wandb_run decides online or offline with it")
    assert read_netrc_auth(host="https://wandb.example.com") is None, "wandb: read_netrc_auth ignores the host"


def test_uvicorn_h11_protocol_internals():
    """medtune.serve.connections subclasses uvicorn's H11Protocol: it replaces `conn`, answers parse errors in
    `send_400_response`, reads `connections`, `cycle`, `transport`, `loop` and `flow`, and hooks `handle_events` and
    `on_response_complete`."""
    H11Protocol = _private("uvicorn.protocols.http.h11_impl", "H11Protocol", "medtune.serve.connections subclasses it")
    ServerState = _private("uvicorn.server", "ServerState", "H11Protocol takes it")

    seen = {"made": None, "next_event": 0, "hint": None, "400": 0, "cycles": 0, "complete": 0}

    class Connection(h11.Connection):
        def next_event(self):
            seen["next_event"] += 1
            try:
                return super().next_event()
            except h11.RemoteProtocolError as e:
                seen["hint"] = e.error_status_hint
                raise

    class Spy(H11Protocol):
        def __init__(self, config, server_state, app_state, _loop=None):
            super().__init__(config, server_state, app_state, _loop)
            self.conn = Connection(h11.SERVER, config.h11_max_incomplete_event_size)

        def connection_made(self, transport):
            super().connection_made(transport)
            seen["made"] = (self in self.connections, self.transport is transport, self.loop is loop,
                            callable(getattr(self.flow, "resume_reading", None)))

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            seen["cycles"] += self.cycle is not cycle

        def on_response_complete(self):
            seen["complete"] += 1
            super().on_response_complete()

        def send_400_response(self, msg):
            seen["400"] += 1
            super().send_400_response(msg)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def request(port, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(200), 5)
        writer.close()
        return answer

    async def main():
        config = uvicorn.Config(app, http=Spy, h11_max_incomplete_event_size=1024, log_level="error")
        state = ServerState()
        server = await loop.create_server(lambda: Spy(config, state, {}, loop), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            ok = await request(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            # headers still incomplete past the limit (h11 checks only what it has not parsed yet)
            too_large = await request(port, b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2048)
        finally:
            server.close()
        return ok, too_large

    loop = asyncio.new_event_loop()
    try:
        ok, too_large = loop.run_until_complete(main())
    finally:
        loop.close()
    assert seen["made"] == (True, True, True, True), (
        "uvicorn: after H11Protocol.connection_made the protocol is no longer in `connections`, or `transport`, "
        "`loop` or `flow.resume_reading` is not what it was; medtune caps open connections and answers with them")
    assert ok.startswith(b"HTTP/1.1 200") and seen["next_event"] > 0, (
        "uvicorn: H11Protocol no longer reads requests through `self.conn` set after __init__(config, server_state, "
        "app_state, _loop); medtune replaces it to keep h11's error_status_hint")
    assert seen["cycles"] >= 1, "uvicorn: handle_events no longer starts a new `cycle` once a request's headers are in"
    assert seen["complete"] >= 1, "uvicorn: on_response_complete is no longer called after a response"
    assert too_large.startswith(b"HTTP/1.1 400") and seen["400"] == 1 and seen["hint"] == 431, (
        "uvicorn/h11: headers over h11_max_incomplete_event_size no longer reach send_400_response with h11's "
        "error_status_hint 431; medtune answers 431 there")


@pytest.mark.parametrize("window", [None, 16])
def test_transformers_dynamic_cache_layers_hold_keys_values_and_a_token_count(tiny_model_dir, window):
    """medtune.inference.decoding joins batches and cuts padding in the cache's layers: `keys`/`values` of shape
    (rows, heads, tokens, dim), and on a sliding-window layer the `cumulative_length` that sizes its mask."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, sliding_window=window)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.ones(2, 5, dtype=torch.long), cache=cache, use_cache=True)
    layers = getattr(cache, "layers", None)
    assert layers and all(tuple(layer.keys.shape[::2]) == (2, 5) and layer.values.shape == layer.keys.shape
                          for layer in layers), (
        "transformers: DynamicCache.layers[i].keys/values are no longer (rows, heads, tokens, dim) tensors; "
        "medtune.inference.decoding.DecodeBatch.join pads and concatenates them")
    if window:
        assert all(getattr(layer, "cumulative_length", None) == 5 for layer in layers), (
            "transformers: a sliding-window cache layer no longer counts its tokens in cumulative_length; "
            "medtune.inference.decoding sets it when batches join and padding is cut")
