"""Connections of medtune-serve: read deadlines, a cap on open connections, 431 for oversized headers, and an access
log without query strings.

uvicorn 0.54 (with h11; httptools is not installed) and h11 0.16 provide, used as they are:
- `timeout_keep_alive` (uvicorn): a connection idle after a response is closed (`--keep-alive-timeout`);
- `h11_max_incomplete_event_size` (h11's limit on a request line and headers still being received):
  `--max-header-bytes`;
- `backlog` (uvicorn): the listen queue, which asyncio also takes as the most connections accepted at once.
What they lack is added by a subclass of uvicorn's h11 protocol (uvicorn takes a protocol class as `http`):
- a deadline for a request's line and headers (`--header-timeout`). uvicorn arms no timer before the first request
  of a connection, and its keep-alive timer stops at the first byte, so a client that sends part of its headers
  and waits holds a connection, and a file descriptor, for as long as it likes;
- a cap on open connections, applied when a connection is accepted (`--max-connections`). uvicorn's
  `limit_concurrency` is checked only once a request's headers are complete, so connections that never complete
  them pile up until accept() fails with EMFILE and nobody, /health included, is served. Past the cap, the
  connection that has waited longest for its client (request line, headers or body incomplete, or idle between
  requests) is closed to make room; when every connection is busy with a request, the newcomer gets 503;
- 431 for headers over the limit: h11 says so (`error_status_hint`), uvicorn answers every parse error with 400,
  and closed the connection at once, so a client still sending its headers got a connection reset instead. Every
  answer given here shuts the connection for writing, then reads and drops what the client still sends for up to
  LINGER_S seconds before closing (a lingering close), so that the client gets to read the answer.
The request body's deadline (`--body-timeout`) is the app's (medtune.serve.protocol.read_body), which answers with
an OpenAI error object.
"""

from __future__ import annotations

import http
import json
import logging
import resource
from dataclasses import dataclass, replace

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from medtune.serve.errors import APIError

log = logging.getLogger("medtune.serve")

LINGER_S = 2.0
WARN_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds from connecting, or from the last response, to a request's headers
    keep_alive_timeout: float = 5.0  # seconds a connection may sit idle after a response
    max_connections: int | None = None  # None: default_max_connections()
    max_header_bytes: int = 16 * 1024  # h11's default


def default_max_connections() -> int:
    """Half the open-file limit (`ulimit -n`), at most 1024: the other half is left for the connections being
    accepted (`backlog`), the model's files, upstream connections and the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(8, min(1024, soft // 2))


def backlog(max_connections: int) -> int:
    """The listen queue, which is also how many connections asyncio accepts in one go: with half the cap, the open
    connections plus one burst stay within 3/4 of the open-file limit at the default cap."""
    return max(8, min(2048, max_connections // 2))


class _Connection(h11.Connection):
    """h11's server connection, keeping the status h11 suggests for the last request it could not parse."""

    error_status = 400

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.error_status = e.error_status_hint
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline, the connection cap and the lingering answers above;
    `limits` is set on the subclass made by protocol_class()."""

    limits: ConnectionLimits
    _warned_at = float("-inf")

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _Connection(h11.SERVER, config.h11_max_incomplete_event_size)
        self.waiting_since = 0.0  # when the client started to owe a request (connected, or got its last response)
        self._deadline = None
        self._received = False  # bytes of the request owed have arrived
        self._lingering = False

    @property
    def waiting_for_client(self) -> bool:
        """Open, with no request of the client's being answered: headers or body still owed, idle, or lingering."""
        return not self.transport.is_closing() and (
            self._lingering or self.conn.their_state in (h11.IDLE, h11.SEND_BODY))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()
        if len(self.connections) > self.limits.max_connections:
            live = [c for c in self.connections if not c.transport.is_closing()]
            if len(live) > self.limits.max_connections:
                self._make_room(live)

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # answered: what the client still sends is read and dropped
            return
        self._received = True
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's line and headers are complete; its body has the app's deadline
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        self._await_request()  # first: uvicorn may start a pipelined request in there
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse: h11's status (431 for headers over the limit)."""
        if self.conn.error_status == 431:
            self._answer(431, f"the request line and headers are over {self.limits.max_header_bytes} bytes "
                              "(--max-header-bytes)", "headers_too_large")
        else:
            self._answer(400, "invalid HTTP request", "invalid_http_request")

    def _await_request(self) -> None:
        self.waiting_since, self._received = self.loop.time(), False
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._received and self.conn.our_state is h11.IDLE:  # part of a request came: say why it ends
            self._answer(408, f"the request headers did not arrive within {self.limits.header_timeout:g} s "
                              "(--header-timeout)", "header_timeout")
        else:  # nothing, or the rest of a body already answered
            self.transport.close()

    def _make_room(self, live: list) -> None:
        waiting = [c for c in live if c is not self and getattr(c, "waiting_for_client", False)]
        now = self.loop.time()
        if now - type(self)._warned_at > WARN_EVERY_S:
            type(self)._warned_at = now
            log.warning("%d connections open (--max-connections %d): %s", len(live) - 1, self.limits.max_connections,
                        "closing those that waited longest for their client" if waiting
                        else "all busy with requests, answering 503 to new ones")
        if waiting:
            min(waiting, key=lambda c: (not c._lingering, c.waiting_since)).transport.close()
        else:
            self._answer(503, f"the server has {self.limits.max_connections} connections open, all busy with "
                              "requests; retry shortly", "too_many_connections", [(b"retry-after", b"1")])

    def _answer(self, status: int, message: str, code: str, headers: list | None = None) -> None:
        """Send an OpenAI error with Connection: close, then close lingering (see the module's doc)."""
        error = APIError(status, message, code=code, type="server_error" if status >= 500 else "invalid_request_error")
        body = json.dumps(error.body()).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), *(headers or [])]
        try:
            out = self.conn.send(h11.Response(status_code=status, headers=head,
                                              reason=http.HTTPStatus(status).phrase.encode()))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # a response is already under way: nothing more can be said
            self.transport.close()
            return
        self.transport.write(out)
        self._lingering = True
        self._cancel_deadline()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    return type("MedtuneH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class _NoQueryString(logging.Filter):
    """uvicorn's access log line without the query string: a URL can carry a secret (a key pasted as ?api_key=)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


_NO_QUERY_STRING = _NoQueryString()


def server_config(app, limits: ConnectionLimits | None = None, **kwargs) -> uvicorn.Config:
    """uvicorn's Config for `app` with `limits` (kwargs: uvicorn's other settings, host and port...)."""
    limits = limits or ConnectionLimits()
    limits = replace(limits, max_connections=limits.max_connections or default_max_connections())
    config = uvicorn.Config(app, http=protocol_class(limits), timeout_keep_alive=limits.keep_alive_timeout,
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            backlog=backlog(limits.max_connections), **kwargs)
    logging.getLogger("uvicorn.access").addFilter(_NO_QUERY_STRING)  # after Config, which configures logging
    return config
