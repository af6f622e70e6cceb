"""`medtune-serve --upstream URL`: the page, triage, API keys and limits in front of another OpenAI-compatible server.

Built for vLLM's OpenAI server (`medtune-serve --print-vllm-command`), and works with any server of that API,
a second medtune-serve included. Requests go through the openai client (AsyncOpenAI on httpx). Responses pass
through as the upstream sends them: read raw (`with_raw_response`, `with_streaming_response`: streams line by line,
as they arrive), not parsed into the client's types; medtune only adds its top-level "triage" object (on the first
chunk of a stream). One attempt per request (`max_retries=0`): the upstream's error goes to the caller, whose
choice a retry is. Closing the upstream request when the client goes away (or times out) lets the upstream
stop generating too.
"""

from __future__ import annotations

import contextlib
import json
from typing import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import httpx
import openai

from medtune.eval.endpoint import NO_ACCOUNT_HEADERS
from medtune.serve.errors import APIError
from medtune.serve.protocol import ChatParams, sse

NO_KEY = "none"  # the openai client needs a key; an upstream without one ignores it


class UpstreamBackend:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 max_in_flight: int = 64, timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.max_in_flight = model, max_in_flight
        self._api_key = api_key or NO_KEY
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._in_flight = 0
        self.client: openai.AsyncOpenAI | None = None

    async def start(self) -> None:
        # No retries: one would hold a place under --max-queue and run past the caller's deadline. On httpx (the
        # client's default is httpx2), whose errors _relay catches.
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self._timeout,
                                         max_retries=0, default_headers=NO_ACCOUNT_HEADERS,
                                         http_client=httpx.AsyncClient())

    async def close(self) -> None:
        await self.client.close()

    def health(self) -> dict:
        return {"upstream": self.base_url, "in_flight": self._in_flight}

    async def models(self) -> list[dict]:
        with self._errors():
            response = await self.client.models.with_raw_response.list()
        return response.http_response.json().get("data", [])

    async def _body(self, params: ChatParams, stream: bool) -> dict:
        if not (model := params.model or self.model):
            models = await self.models()
            if not models:
                raise APIError(502, f"the upstream {self.base_url} lists no model", type="server_error",
                               code="upstream_error")
            model = self.model = models[0]["id"]
        body = {"model": model, "messages": params.messages, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "stream": stream}
        if params.stop:
            body["stop"] = list(params.stop)
        if stream and params.include_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The client's errors as medtune's: the upstream's own error kept, the others a 502 or 504."""
        try:
            yield
        except openai.APITimeoutError:
            raise APIError(504, f"the upstream {self.base_url} did not answer in time", type="server_error",
                           code="upstream_timeout") from None
        except openai.APIConnectionError as e:
            raise APIError(502, f"the upstream {self.base_url} cannot be reached: {e.__cause__ or e}",
                           type="server_error", code="upstream_error") from None
        except openai.APIStatusError as e:
            raise upstream_error(e.status_code, e.response.content, self.base_url) from None

    def _acquire(self) -> None:
        if self._in_flight >= self.max_in_flight:
            raise APIError(503, f"the server is busy: {self._in_flight} requests in flight", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"})
        self._in_flight += 1

    async def complete(self, params: ChatParams, meta: dict, triage: dict, deadline: float) -> dict:
        self._acquire()
        try:
            body = await self._body(params, stream=False)
            with self._errors():
                response = await self.client.chat.completions.with_raw_response.create(**body)
            return {**response.http_response.json(), "triage": triage}
        finally:
            self._in_flight -= 1

    async def stream(self, params: ChatParams, meta: dict, triage: dict,
                     deadline: float) -> tuple[AsyncIterator[str], Callable[[], Awaitable[None]]]:
        """The chunks to relay, and a cleanup (idempotent) that closes the upstream request."""
        self._acquire()
        request = contextlib.AsyncExitStack()  # holds the response open until the cleanup
        try:  # the upstream's status decides ours, so it is awaited before the first byte goes out
            body = await self._body(params, stream=True)
            with self._errors():
                response = await request.enter_async_context(
                    self.client.chat.completions.with_streaming_response.create(**body))
        except BaseException:
            self._in_flight -= 1
            raise
        closed = False

        async def cleanup() -> None:
            nonlocal closed
            if not closed:
                closed = True
                with anyio.CancelScope(shield=True):  # on client disconnect this runs inside a cancelled scope
                    await request.aclose()
                self._in_flight -= 1

        return self._relay(response, triage, cleanup), cleanup

    async def _relay(self, response: openai.AsyncAPIResponse, triage: dict, cleanup) -> AsyncIterator[str]:
        try:
            first = True
            async for line in response.iter_lines():
                if first and line.startswith("data: {"):
                    line, first = "data: " + json.dumps({**json.loads(line[6:]), "triage": triage}), False
                yield line + "\n"
        except httpx.HTTPError as e:
            yield sse(APIError(502, f"the upstream stream broke off: {e}", type="server_error",
                               code="upstream_error").body())
        finally:
            await cleanup()


def upstream_error(status: int, content: bytes, url: str) -> APIError:
    """The upstream's error, kept as it is when it is an OpenAI error object (vLLM's older top-level form too)."""
    if status in (401, 403):  # medtune's own key for the upstream, not the client's: the client cannot fix it
        return APIError(502, f"the upstream {url} refused medtune's credentials (--upstream-api-key)",
                        type="server_error", code="upstream_error")
    try:
        data = json.loads(content)
        err = data.get("error", data) if isinstance(data, dict) else None
    except ValueError:
        err = None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return APIError(status, err["message"], err.get("param"), err.get("code"), err.get("type") or "upstream_error")
    return APIError(502, f"the upstream {url} answered {status}: {content[:200].decode(errors='replace')}",
                    type="server_error", code="upstream_error")
