"""Who may use the server: the Host header check, the API key and the JSON-only request bodies.

- Host: a page on another site can make a browser send requests to 127.0.0.1 under its own name (DNS rebinding);
  answering only the names the server is bound to, or the ones listed, stops that.
- API key: /v1 requires `Authorization: Bearer KEY` when a key is set (the page and /health stay open).
- Content type: a web page may POST `text/plain` (or form data) anywhere without a CORS preflight; the API answers
  415 to every body that is not declared JSON.
- A key in the URL (`?api_key=...`) is refused, never checked: URLs end up in logs, proxies and browser history
  (the access log leaves query strings out, medtune.serve.connections).
"""

from __future__ import annotations

import ipaddress
import socket
from hmac import compare_digest
from urllib.parse import parse_qsl

from medtune.serve.errors import APIError

WILDCARD_BINDS = {"0.0.0.0", "::", ""}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# Query parameter names that carry credentials (compared lowercased, "-" read as "_").
KEY_PARAMS = {"api_key", "apikey", "key", "token", "access_token", "auth", "authorization"}


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
    """"example.org:8000" -> "example.org", "[::1]:8000" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def key_in_query(query_string: bytes) -> str | None:
    """The name of the first query parameter that looks like a credential, or None."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return next((name for name, _ in pairs if name.lower().replace("-", "_") in KEY_PARAMS), None)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class Guard:
    """ASGI middleware: the Host check and no key in the URL on every request; for /v1 also the API key, then the
    JSON content type."""

    def __init__(self, app, api_key: str | None = None, hosts: set[str] | None = None):
        self.app, self.api_key, self.hosts = app, api_key, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (error := self.check(scope)) is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return APIError(400, f"this server does not answer for the host name {host!r} (see --allowed-hosts)",
                            code="invalid_host")
        if (name := key_in_query(scope.get("query_string", b""))) is not None:
            return APIError(400, f"the URL carries a credential ({name!r}): send the key in the header "
                                 "'Authorization: Bearer <key>', never in the URL, which logs keep", name,
                            "key_in_query")
        if not scope["path"].startswith("/v1/"):
            return None
        if self.api_key and not compare_digest(headers.get("authorization", "").encode(),
                                               f"Bearer {self.api_key}".encode()):
            return APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST" and not _is_json(headers.get("content-type", "")):
            return APIError(415, "the request body must be JSON (Content-Type: application/json)",
                            code="unsupported_media_type")
        return None
