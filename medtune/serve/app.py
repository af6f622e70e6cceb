"""`medtune-serve`: an OpenAI-compatible chat completions API and a one-page web chat.

FastAPI + uvicorn: Server-Sent Events streaming (the wire format the `openai` client expects) is a
StreamingResponse, request bodies are validated with pydantic, and both are widely used and maintained.

Generation runs in worker threads (never on the event loop) and one request generates at a time (an anyio
lock): a single model instance is not shared by concurrent forward passes, and waiting requests queue up.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medtune.chat_format import encode_messages
from medtune.inference import DEFAULT_SYSTEM_PROMPT, complete, load_model_or_demo, stream, with_system_prompt

log = logging.getLogger("medtune.serve")
STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Limits:
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8000
    max_tokens: int = 1024


@dataclass
class ServerSettings:
    model_name: str = "medtune"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    default_max_tokens: int = 256
    default_temperature: float = 0.7
    limits: Limits = field(default_factory=Limits)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def check_limits(req: ChatRequest, limits: Limits) -> int:
    """Validate the request against the limits; returns the max_tokens to use."""
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(req.messages)} > {limits.max_messages}", "messages",
                       "too_many_messages")
    for i, m in enumerate(req.messages):
        if len(m.content) > limits.max_message_chars:
            raise APIError(400, f"message {i} is too long: {len(m.content)} characters > "
                                f"{limits.max_message_chars}", f"messages[{i}].content", "message_too_long")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is too large: {max_tokens} > {limits.max_tokens}", "max_tokens",
                       "max_tokens_too_large")
    return max_tokens


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond `limit` bytes (checked while reading, not after)."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")
    return body


def parse_request(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"invalid request: {param}: {err['msg']}" if param else f"invalid request: "
                                                                                    f"{err['msg']}", param) from e


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(model, tok, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    limits = settings.limits
    app = FastAPI(title="medtune", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    lock = anyio.Lock()
    context_size = getattr(model.config, "max_position_embeddings", None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "medtune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_body(request, limits.max_body_bytes))
        max_tokens = check_limits(req, limits) or settings.default_max_tokens
        messages = with_system_prompt([m.model_dump() for m in req.messages], settings.system_prompt)
        prompt_tokens = len(encode_messages(tok, messages))
        if context_size and prompt_tokens + max_tokens > context_size:
            raise APIError(400, f"the conversation ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                                f"exceeds the context size ({context_size})", "messages", "context_length_exceeded")
        temperature = settings.default_temperature if req.temperature is None else req.temperature
        options = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=req.top_p)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(messages, options, meta, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with lock:
            (result,) = await run_in_threadpool(complete, model, tok, [messages], **options)
        return {
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    async def stream_events(messages, options, meta, include_usage: bool):
        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return sse({**meta, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

        async with lock:
            pieces = await run_in_threadpool(stream, model, tok, messages, **options)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                    yield chunk({"content": piece})
                yield chunk({}, pieces.finish_reason)
                if include_usage:
                    total = pieces.prompt_tokens + pieces.completion_tokens
                    yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": {
                        "prompt_tokens": pieces.prompt_tokens, "completion_tokens": pieces.completion_tokens,
                        "total_tokens": total}})
                yield sse("[DONE]")
            except Exception as e:  # headers are already sent: report the failure in the stream
                log.exception("generation failed")
                yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                     "param": None, "code": None}})
            finally:  # also on client disconnect: stop generating before the next request starts
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(pieces.close)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve a medtune model: OpenAI-compatible API and web chat.")
    parser.add_argument("--model", help="merged model folder or LoRA adapter folder (default: tiny demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", help="system prompt used when a client sends none")
    prompt.add_argument("--system-prompt-file", type=Path, help="read the system prompt from this file")
    parser.add_argument("--max-tokens", type=int, default=256, help="default reply length in tokens")
    parser.add_argument("--max-tokens-limit", type=int, default=Limits.max_tokens, help="largest max_tokens allowed")
    parser.add_argument("--temperature", type=float, default=0.7, help="default sampling temperature")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.host not in LOCAL_HOSTS:
        log.warning("binding to %s: the server has no authentication and anyone who can reach this address "
                    "can use it; put it behind an authenticating proxy", args.host)
    system_prompt = args.system_prompt_file.read_text().strip() if args.system_prompt_file else args.system_prompt
    model, tok = load_model_or_demo(args.model, args.device)
    name = Path(args.model).resolve().name if args.model else "tiny-starling-demo"
    settings = ServerSettings(
        model_name=name, system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt,
        default_max_tokens=min(args.max_tokens, args.max_tokens_limit), default_temperature=args.temperature,
        limits=Limits(max_tokens=args.max_tokens_limit),
    )
    log.info("web chat on http://%s:%d/  API on http://%s:%d/v1", args.host, args.port, args.host, args.port)
    uvicorn.run(create_app(model, tok, settings), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
