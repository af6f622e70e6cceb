"""The OpenAI chat-completions wire format: request validation and limits, and the response and chunk bodies."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medtune.chat_format import with_system_prompt
from medtune.generation import GREEDY_TEMPERATURE
from medtune.serve.errors import APIError


@dataclass
class Limits:
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8000
    max_tokens: int = 1024


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
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None


@dataclass(frozen=True)
class ChatParams:
    """A validated request, as a backend needs it."""

    model: str | None
    messages: list[dict]  # the system prompt included
    max_tokens: int
    fit_to_context: bool  # max_tokens is the server's default, which may shrink to what the context leaves
    temperature: float  # 0.0 for greedy (below GREEDY_TEMPERATURE)
    top_p: float
    stop: tuple[str, ...]
    include_usage: bool


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
        raise APIError(400, f"invalid request: {param}: {err['msg']}" if param else f"invalid request: {err['msg']}",
                       param) from None


def chat_params(req: ChatRequest, limits: Limits, system_prompt: str, default_max_tokens: int,
                default_temperature: float) -> ChatParams:
    """Check `req` against the limits and fill in the server's defaults."""
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
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4 or not all(stop):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop", "invalid_stop")
    temperature = default_temperature if req.temperature is None else req.temperature
    return ChatParams(
        model=req.model, messages=with_system_prompt([m.model_dump() for m in req.messages], system_prompt),
        max_tokens=max_tokens or default_max_tokens, fit_to_context=max_tokens is None,
        temperature=0.0 if temperature < GREEDY_TEMPERATURE else temperature, top_p=req.top_p, stop=stop,
        include_usage=bool((req.stream_options or {}).get("include_usage")),
    )


def response_meta() -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(meta: dict, triage: dict, text: str, finish_reason: str, counts: dict) -> dict:
    return {**meta, "object": "chat.completion", "triage": triage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": counts}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chunk(meta: dict, delta: dict | None, finish_reason: str | None = None, **extra) -> str:
    """One `chat.completion.chunk` event; delta None gives the usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return sse({**meta, "object": "chat.completion.chunk", **extra, "choices": choices})
