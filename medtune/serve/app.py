"""The web app of `medtune-serve`: the chat page and an OpenAI-compatible API in front of a backend.

FastAPI + uvicorn: Server-Sent Events streaming (the wire format the `openai` client expects) is a
StreamingResponse. The backend is the model loaded here behind the dynamic batcher (medtune.serve.local) or another
OpenAI-compatible server (medtune.serve.upstream); either way this app adds the checks (Host, API key, content type,
limits), the emergency triage of the person's latest message, the per-request timeout and the cancellation of
work whose client has gone.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT
from medtune.inference.generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from medtune.serve.errors import install_error_handlers, timeout_error
from medtune.serve.protocol import Limits, chat_params, parse_request, read_body, response_meta, sse
from medtune.serve.security import LOOPBACK_NAMES, Guard, TrustedHost
from medtune.inference.triage import triage_messages

STATIC = Path(__file__).parent / "static"
# The page runs only its own script and talks only to this server: even text that slipped past the page's escaping
# could not run code or load anything.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass
class ServerSettings:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    default_temperature: float = DEFAULT_TEMPERATURE
    request_timeout: float = 300.0  # seconds from arrival to the last token, queueing included
    body_timeout: float = 30.0  # seconds from the headers to the end of the request body
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    allowed_hosts: set[str] | None = field(default_factory=lambda: set(LOOPBACK_NAMES))  # None: any
    cors_origins: tuple[str, ...] = ()  # none: browsers keep other sites' pages out of the API


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work, deadline: float):
    """The result of `work`, which is cancelled (so generation stops) if the client leaves or the deadline passes."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            return Response(status_code=499)  # nobody is left to read it
        raise timeout_error()
    finally:
        task.cancel()
        gone.cancel()


async def _until_deadline(events: AsyncIterator[str], deadline: float) -> AsyncIterator[str]:
    """The chunks of a stream until the deadline; then the stream ends with the timeout error (the headers are sent,
    so it goes in the stream, and no [DONE] follows). Waiting for the next chunk is cancelled, so the backend's own
    cleanup stops the generation, local or upstream."""
    try:
        while True:
            try:
                yield await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                yield sse(timeout_error().body())
                return
    finally:
        await events.aclose()


def create_app(backend, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(title="medtune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.backend = backend
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key)
    app.add_middleware(TrustedHost, hosts=settings.allowed_hosts)  # outside Guard: the Host is checked first
    if settings.cors_origins:  # added last, so outermost: preflights are answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", **backend.health()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": await backend.models()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_body(request, limits.max_body_bytes, settings.body_timeout))
        params = chat_params(req, limits, settings.system_prompt, settings.default_max_tokens,
                             settings.default_temperature)
        triage = triage_messages(params.messages).as_dict()
        deadline = time.monotonic() + settings.request_timeout
        if req.stream:
            events, cleanup = await backend.stream(params, response_meta(), triage, deadline)
            # cleanup also runs when the client left before the first chunk (the stream never started)
            return StreamingResponse(_until_deadline(events, deadline), media_type="text/event-stream",
                                     background=BackgroundTask(cleanup),
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _unless_gone(request, backend.complete(params, response_meta(), triage, deadline), deadline)

    return app
