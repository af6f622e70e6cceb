"""The OpenAI chat-completions wire format: request validation and limits (pydantic models of medtune's), and the
response and chunk bodies (the `openai` package's own models, plus medtune's top-level "triage")."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medtune.inference.chat_format import with_system_prompt
from medtune.inference.generation import GREEDY_TEMPERATURE
from medtune.serve.errors import APIError

MAX_STOP = 4  # OpenAI's limit on the number of stop strings


@dataclass
class Limits:
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64
    max_message_chars: int = 8000
    max_tokens: int = 1024
    # Characters per stop string: MAX_STOP_SEQ_LENGTH of vLLM's TGIS adapter (opendatahub-io/vllm-tgis-adapter,
    # src/vllm_tgis_adapter/grpc/validation.py). Holding back text that may start a stop string costs time in the
    # stop strings' length on every token, for every row of the batch.
    max_stop_chars: int = 240


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list  # a string, or OpenAI's content parts, read by message_text (which names a bad part)

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, value):
        if not isinstance(value, (str, list)):  # one clear error, not one per branch of the union
            raise ValueError("content must be a string or a list of content parts")
        return value


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
    n: int | None = None  # None or 1: one choice
    logprobs: bool | None = None
    top_logprobs: int | None = None
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


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 beyond `limit` bytes (checked while reading, not after), and with 408 when
    it is not complete `timeout` seconds after the headers: a client that sends part of a body and waits would
    otherwise hold its connection for as long as it likes. The 408 closes the connection."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")
    deadline = time.monotonic() + timeout
    chunks, body = request.stream(), bytearray()
    while True:
        try:
            body += await asyncio.wait_for(anext(chunks), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return bytes(body)
        except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
            raise APIError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)",
                           code="body_timeout", headers={"Connection": "close"}) from None
        if len(body) > limit:
            raise APIError(413, f"request body too large (limit {limit} bytes)", code="request_too_large")


def parse_request(body: bytes) -> ChatRequest:
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"invalid request: {param}: {err['msg']}" if param else f"invalid request: {err['msg']}",
                       param) from None


def message_text(message: Message, i: int) -> str:
    """A message's text: its content, or its text parts joined in order with "\\n" (as vLLM joins them,
    vllm/entrypoints/chat_utils.py); any other part (image, audio, file) is a 400 that names it."""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise APIError(400, f"{where} is not a content part: it needs a 'type'", where)
        if kind != "text":
            raise APIError(400, f"{where} is a {kind!r} part: this server reads text only", where,
                           "unsupported_content")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: a text part needs a string 'text'", f"{where}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_unsupported(req: ChatRequest) -> None:
    """Options this server cannot honour get a 400 rather than a reply that pretends otherwise."""
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: this server returns one choice per request (n=1)", "n",
                       "unsupported_parameter")
    for name in ("logprobs", "top_logprobs"):
        if getattr(req, name):
            raise APIError(400, f"{name}: this server does not return log probabilities", name,
                           "unsupported_parameter")


def _stop_strings(req: ChatRequest, limits: Limits) -> tuple[str, ...]:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP or not all(stop):
        raise APIError(400, f"stop takes up to {MAX_STOP} non-empty strings", "stop", "invalid_stop")
    for i, s in enumerate(stop):
        if len(s) > limits.max_stop_chars:
            raise APIError(400, f"stop string {i} is {len(s)} characters long; the limit is {limits.max_stop_chars}",
                           "stop", "invalid_stop")
    return stop


def chat_params(req: ChatRequest, limits: Limits, system_prompt: str, default_max_tokens: int,
                default_temperature: float) -> ChatParams:
    """Check `req` against the limits and fill in the server's defaults."""
    _check_unsupported(req)
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(req.messages)} > {limits.max_messages}", "messages",
                       "too_many_messages")
    messages = []
    for i, m in enumerate(req.messages):
        text = message_text(m, i)
        if len(text) > limits.max_message_chars:
            raise APIError(400, f"message {i} is too long: {len(text)} characters > "
                                f"{limits.max_message_chars}", f"messages[{i}].content", "message_too_long")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    # The error names the field the client sent; max_completion_tokens wins when both are there.
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"{name} is too large: {max_tokens} > {limits.max_tokens}", name,
                       "max_tokens_too_large")
    temperature = default_temperature if req.temperature is None else req.temperature
    return ChatParams(
        model=req.model, messages=with_system_prompt(messages, system_prompt),
        max_tokens=max_tokens or default_max_tokens, fit_to_context=max_tokens is None,
        temperature=0.0 if temperature < GREEDY_TEMPERATURE else temperature, top_p=req.top_p,
        stop=_stop_strings(req, limits), include_usage=bool((req.stream_options or {}).get("include_usage")),
    )


# The bodies are openai's models (which take extra fields, such as "triage") turned into dicts by their to_dict,
# which leaves out every field not set here: no null field appears that the reply did not have before.


def response_meta() -> dict:
    """The id and time of one response, shared by all its chunks (the backend adds "model")."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def completion_body(meta: dict, triage: dict, text: str, finish_reason: str, counts: CompletionUsage) -> dict:
    message = ChatCompletionMessage(role="assistant", content=text)
    return ChatCompletion(**meta, object="chat.completion", triage=triage, usage=counts,
                          choices=[Choice(index=0, message=message, finish_reason=finish_reason)]).to_dict()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chunk(meta: dict, delta: dict | None, finish_reason: str | None = None, **extra) -> str:
    """One `chat.completion.chunk` event; delta None gives the usage chunk (no choices). `extra`: triage or usage."""
    choices = [] if delta is None else [ChunkChoice(index=0, delta=ChoiceDelta(**delta), finish_reason=finish_reason)]
    return sse(ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=choices, **extra).to_dict())
