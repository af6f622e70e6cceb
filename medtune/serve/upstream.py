"""`medtune-serve --upstream URL`: the page, triage, API keys and limits in front of another OpenAI-compatible server.

Built for vLLM's OpenAI server (`medtune-serve --print-vllm-command`), and works with any server of that API,
a second medtune-serve included. Responses pass through as the upstream sends them (streams line by line, as
they arrive); medtune only adds its top-level "triage" object (on the first chunk of a stream). Closing the
upstream request when the client goes away (or times out) lets the upstream stop generating too.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Awaitable, Callable

import anyio
import httpx

from medtune.serve.errors import APIError
from medtune.serve.protocol import ChatParams, sse


class UpstreamBackend:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 max_in_flight: int = 64, timeout: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.max_in_flight = model, max_in_flight
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._in_flight = 0
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)

    async def close(self) -> None:
        await self.client.aclose()

    def health(self) -> dict:
        return {"upstream": self.base_url, "in_flight": self._in_flight}

    async def models(self) -> list[dict]:
        response = await self._send("GET", "/models")
        return response.json().get("data", [])

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

    async def _send(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> httpx.Response:
        try:
            response = await self.client.send(self.client.build_request(method, path, json=body), stream=stream)
        except httpx.TimeoutException:
            raise APIError(504, f"the upstream {self.base_url} did not answer in time", type="server_error",
                           code="upstream_timeout") from None
        except httpx.HTTPError as e:
            raise APIError(502, f"the upstream {self.base_url} cannot be reached: {e}", type="server_error",
                           code="upstream_error") from None
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise upstream_error(response.status_code, content, self.base_url)
        return response

    def _acquire(self) -> None:
        if self._in_flight >= self.max_in_flight:
            raise APIError(503, f"the server is busy: {self._in_flight} requests in flight", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"})
        self._in_flight += 1

    async def complete(self, params: ChatParams, meta: dict, triage: dict, deadline: float) -> dict:
        self._acquire()
        try:
            response = await self._send("POST", "/chat/completions", await self._body(params, stream=False))
            return {**response.json(), "triage": triage}
        finally:
            self._in_flight -= 1

    async def stream(self, params: ChatParams, meta: dict, triage: dict,
                     deadline: float) -> tuple[AsyncIterator[str], Callable[[], Awaitable[None]]]:
        """The chunks to relay, and a cleanup (idempotent) that closes the upstream request."""
        self._acquire()
        try:  # the upstream's status decides ours, so it is awaited before the first byte goes out
            response = await self._send("POST", "/chat/completions", await self._body(params, stream=True), stream=True)
        except BaseException:
            self._in_flight -= 1
            raise
        closed = False

        async def cleanup() -> None:
            nonlocal closed
            if not closed:
                closed = True
                with anyio.CancelScope(shield=True):  # on client disconnect this runs inside a cancelled scope
                    await response.aclose()
                self._in_flight -= 1

        return self._relay(response, triage, cleanup), cleanup

    async def _relay(self, response: httpx.Response, triage: dict, cleanup) -> AsyncIterator[str]:
        try:
            first = True
            async for line in response.aiter_lines():
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
