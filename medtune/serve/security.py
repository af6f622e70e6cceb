"""Who may use the server: the Host header check, the API key and the JSON-only request bodies.

- Host: a page on another site can make a browser send requests to 127.0.0.1 under its own name (DNS rebinding);
  answering only the names the server is bound to, or the ones listed, stops that. Starlette's
  TrustedHostMiddleware does the check; TrustedHost answers its refusals with medtune's JSON error.
- API key: /v1 requires `Authorization: Bearer KEY` when a key is set (the page and /health stay open). FastAPI's
  HTTPBearer reads the header; hmac.compare_digest compares the key in constant time.
- Content type (by hand): a web page may POST `text/plain` (or form data) anywhere without a CORS preflight; the
  API answers 415 to every body that is not declared JSON.
- A key in the URL (`?api_key=...`, by hand) is refused, never checked: URLs end up in logs, proxies and browser
  history (the access log leaves query strings out, medtune.serve.connections).
"""

from __future__ import annotations

import ipaddress
import socket
from hmac import compare_digest

from fastapi.security import HTTPBearer
from starlette.datastructures import Headers, QueryParams
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection

from medtune.serve.errors import APIError

WILDCARD_BINDS = {"0.0.0.0", "::", ""}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# Query parameter names that carry credentials (compared lowercased, "-" read as "_").
KEY_PARAMS = {"api_key", "apikey", "key", "token", "access_token", "auth", "authorization"}
HOST_PASSED = "medtune.host_passed"  # set in the scope of a request that passed the Host check


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> set[str] | None:
    """Host names to answer: loopback, the bound address (this machine's names when bound to all), `extra`.

    None (no check) when `extra` holds "*".
    """
    if "*" in extra:
        return None
    hosts = {*LOOPBACK_NAMES, *extra}
    if bind_host in WILDCARD_BINDS:
        hosts |= {socket.gethostname(), socket.getfqdn()}
    else:
        hosts.add(bind_host)
    return {h.lower().strip("[]") for h in hosts}


def host_name(header: str) -> str:
    """The name a Host header asks for, as the refusal names it: "example.org:8000" -> "example.org",
    "[::1]:8000" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def key_in_query(params: QueryParams) -> str | None:
    """The name of the first query parameter that looks like a credential, or None."""
    return next((name for name in params if name.lower().replace("-", "_") in KEY_PARAMS), None)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class TrustedHost(TrustedHostMiddleware):
    """Starlette's Host check, refusing with medtune's JSON error (`invalid_host`): Starlette's own refusal is a
    plain-text 400 "Invalid host header", which API clients cannot read as an OpenAI error."""

    def __init__(self, app, hosts: set[str] | None):
        async def passed(scope, receive, send):
            scope[HOST_PASSED] = True  # what json_refusal sees from here on is the app's, not a refusal
            await app(scope, receive, send)

        # Starlette compares IPv6 addresses in brackets, as Host headers carry them; no redirects to www. names.
        names = None if hosts is None else [f"[{h}]" if ":" in h else h for h in hosts]
        super().__init__(passed, names, www_redirect=False)

    async def __call__(self, scope, receive, send):
        async def json_refusal(message):
            if scope.get(HOST_PASSED) or scope["type"] != "http":
                await send(message)
            elif message["type"] == "http.response.start":  # Starlette's refusal (its body is dropped): ours instead
                host = host_name(Headers(scope=scope).get("host", ""))
                await APIError(400, f"this server does not answer for the host name {host!r} (see --allowed-hosts)",
                               code="invalid_host").response()(scope, receive, send)

        await super().__call__(scope, receive, json_refusal)


class Guard:
    """ASGI middleware: no key in the URL on every request; for /v1 also the API key, then the JSON content type."""

    def __init__(self, app, api_key: str | None = None):
        self.app, self.api_key = app, api_key
        self.bearer = HTTPBearer(auto_error=False)  # None when there is no Bearer key: the 401 is medtune's

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (error := await self.check(HTTPConnection(scope))) is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def check(self, request: HTTPConnection) -> APIError | None:
        # By hand: neither Starlette nor FastAPI looks for credentials in the URL.
        if (name := key_in_query(request.query_params)) is not None:
            return APIError(400, f"the URL carries a credential ({name!r}): send the key in the header "
                                 "'Authorization: Bearer <key>', never in the URL, which logs keep", name,
                            "key_in_query")
        if not request.scope["path"].startswith("/v1/"):
            return None
        if self.api_key:
            credentials = await self.bearer(request)
            if credentials is None or not compare_digest(credentials.credentials.encode(), self.api_key.encode()):
                return APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        # By hand: FastAPI has no 415 (its strict_content_type covers parsed body parameters; this app reads raw bytes).
        if request.scope["method"] == "POST" and not _is_json(request.headers.get("content-type", "")):
            return APIError(415, "the request body must be JSON (Content-Type: application/json)",
                            code="unsupported_media_type")
        return None
