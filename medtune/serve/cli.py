"""`medtune-serve`: the web chat page and an OpenAI-compatible API for a medtune model.

    medtune-serve --model exported/starling-medtuned            # this machine only, http://127.0.0.1:8000/
    medtune-serve --model exported/starling-medtuned/model-q4_k_m.gguf   # on llama.cpp: a laptop's CPU
    MEDTUNE_API_KEY=... medtune-serve --model ... --host 0.0.0.0 --allowed-hosts chat.example.org
    medtune-serve --model exported/starling-medtuned --print-vllm-command
    medtune-serve --upstream http://gpu-node:8000/v1 --upstream-model starling-medtuned
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
from pathlib import Path

from medtune.command_line import add_runtime_arguments
from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.inference.generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from medtune.serve.connections import ConnectionLimits, backlog, default_max_connections
from medtune.serve.protocol import Limits
from medtune.serve.security import allowed_hosts, is_loopback

log = logging.getLogger("medtune.serve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a medtune model: web chat page and OpenAI-compatible API.")
    p.add_argument("--model", help="merged model folder, LoRA adapter folder or .gguf file (default: tiny demo model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    add_runtime_arguments(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="system prompt used when a client sends none")
    prompt.add_argument("--system-prompt-file", type=Path, help="read the system prompt from this file")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="default reply length in tokens")
    p.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens, help="largest max_tokens allowed")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="default sampling temperature")
    p.add_argument("--max-model-len", type=int, help="context size in tokens (default: the model's)")
    load = p.add_argument_group("load")
    load.add_argument("--max-batch-size", type=int, default=8,
                      help="requests generated together (default: %(default)s; 1 = one at a time)")
    load.add_argument("--max-queue", type=int, default=64,
                      help="requests waiting, beyond which 503 (with --upstream: in flight) (default: %(default)s)")
    load.add_argument("--request-timeout", type=float, default=300.0,
                      help="seconds from arrival to the last token (default: %(default)s)")
    conns = p.add_argument_group("connections")
    conns.add_argument("--header-timeout", type=float, default=ConnectionLimits.header_timeout,
                       help="seconds a client has, from connecting or from its last response, to send a request's "
                            "line and headers, else 408 or closed (default: %(default)s)")
    conns.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds from the headers to the end of the request body, else 408 (default: %(default)s)")
    conns.add_argument("--keep-alive-timeout", type=float, default=ConnectionLimits.keep_alive_timeout,
                       help="seconds an idle connection stays open after a response (default: %(default)s)")
    conns.add_argument("--max-connections", type=int,
                       help="open connections at most; past it the one that waited longest for its client is "
                            "closed, or 503 when all are busy (default: half of `ulimit -n`, at most 1024: "
                            f"{default_max_connections()} here)")
    conns.add_argument("--max-header-bytes", type=int, default=ConnectionLimits.max_header_bytes,
                       help="request line and headers at most, else 431 (default: %(default)s)")
    access = p.add_argument_group("access")
    access.add_argument("--api-key", default=os.environ.get("MEDTUNE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $MEDTUNE_API_KEY)")
    access.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --host without an API key (e.g. behind an authenticating proxy)")
    access.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                        help="Host header names to answer besides loopback and the bound address "
                             "('*.example.org' for its subdomains); '*' for any")
    access.add_argument("--cors-origins", nargs="+", default=[], metavar="ORIGIN",
                        help="web origins allowed to call the API from a browser (default: none)")
    scale = p.add_argument_group("scale-out")
    scale.add_argument("--upstream", metavar="URL",
                       help="serve the page, triage and keys in front of this OpenAI-compatible API (e.g. vLLM's /v1)")
    scale.add_argument("--upstream-api-key", default=os.environ.get("MEDTUNE_UPSTREAM_API_KEY"),
                       help="key for the upstream (default: $MEDTUNE_UPSTREAM_API_KEY)")
    scale.add_argument("--upstream-model", help="model name at the upstream (default: the first it lists)")
    scale.add_argument("--print-vllm-command", action="store_true",
                       help="print the vLLM OpenAI-server command for --model and exit")
    return p


def build_backend(args):
    if args.upstream:
        from medtune.serve.upstream import UpstreamBackend

        return UpstreamBackend(args.upstream, args.upstream_api_key, args.upstream_model, args.max_queue,
                               args.request_timeout)
    from medtune.inference.load import load_for_inference_or_demo
    from medtune.serve.local import LocalBackend

    model, fmt = load_for_inference_or_demo(args.model, args.device, args.dtype, args.adapter_base, args.engine,
                                            args.max_batch_size, args.max_model_len)
    name = Path(args.model).resolve().name if args.model else "tiny-starling-demo"
    return LocalBackend(model, fmt, name, args.max_batch_size, args.max_queue, args.max_model_len)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.print_vllm_command:
        if not args.model:
            p.error("--print-vllm-command needs --model (an exported model folder or an adapter folder)")
        from medtune.serve.vllm import vllm_instructions

        print(vllm_instructions(args.model, max_model_len=args.max_model_len))
        return
    if args.upstream and args.model:
        p.error("--upstream serves another server's model: leave out --model")
    if not is_loopback(args.host) and not args.api_key and not args.insecure_no_auth:
        p.error(f"--host {args.host} would let anyone who can reach it use the model: set --api-key (or "
                "MEDTUNE_API_KEY), or pass --insecure-no-auth if an authenticating proxy is in front")
    if bad := [h for h in args.allowed_hosts if h != "*" and "*" in h.removeprefix("*.")]:
        p.error(f"--allowed-hosts {bad[0]}: a '*' stands alone (any name) or opens a name ('*.example.org')")
    limits = connection_limits(p, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import uvicorn

    from medtune.serve.app import ServerSettings, create_app
    from medtune.serve.connections import server_config

    system_prompt = args.system_prompt_file.read_text().strip() if args.system_prompt_file else args.system_prompt
    settings = ServerSettings(
        system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt,
        default_max_tokens=min(args.max_tokens, args.max_tokens_limit), default_temperature=args.temperature,
        request_timeout=args.request_timeout, body_timeout=args.body_timeout,
        limits=Limits(max_tokens=args.max_tokens_limit),
        api_key=args.api_key, allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
        cors_origins=tuple(args.cors_origins),
    )
    try:
        backend = build_backend(args)
    except (ValueError, OSError) as err:  # a missing or damaged .gguf, an engine that cannot run the model
        p.error(str(err))
    app = create_app(backend, settings)
    log.info("web chat on http://%s:%d/  API on http://%s:%d/v1%s", args.host, args.port, args.host, args.port,
             "" if args.api_key else " (no API key)")
    uvicorn.Server(server_config(app, limits, host=args.host, port=args.port)).run()


def connection_limits(p: argparse.ArgumentParser, args) -> ConnectionLimits:
    for flag in ("header_timeout", "body_timeout", "keep_alive_timeout", "max_header_bytes"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_connections is not None:
        if args.max_connections < 1:
            p.error("--max-connections must be at least 1")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = args.max_connections + backlog(args.max_connections)
        if soft != resource.RLIM_INFINITY and needed > soft:
            p.error(f"--max-connections {args.max_connections} (accepting up to {backlog(args.max_connections)} "
                    f"more at once) needs {needed} open files, and this process may open {soft} (ulimit -n)")
    return ConnectionLimits(header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                            max_connections=args.max_connections, max_header_bytes=args.max_header_bytes)


if __name__ == "__main__":
    main()
