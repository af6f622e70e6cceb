"""medtune-serve apps on real uvicorn servers in the test process, and raw-socket clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import uvicorn

from medtune.serve.app import ServerSettings, create_app
from medtune.serve.connections import ConnectionLimits, server_config
from medtune.serve.local import LocalBackend
from medtune.serve.protocol import Limits

LIMITS = Limits(max_body_bytes=20_000, max_messages=8, max_message_chars=2000, max_tokens=2000)


class LocalServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a background thread, configured as medtune-serve
    configures it (medtune.serve.connections.server_config) with `limits`.

    `sndbuf` caps the kernel send buffer of every connection (accepted sockets inherit it from the listening one),
    so that a client that stops reading blocks the server's writes after a few kilobytes.
    """

    def __init__(self, app, sndbuf: int | None = None, limits: ConnectionLimits | None = None):
        self.app = app
        self.sock = socket.socket()
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, limits, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def backend(self):
        return self.app.state.backend

    def __enter__(self):
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            self.thread.join(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def local_server(model_and_tok, settings: ServerSettings | None = None, sndbuf: int | None = None,
                 limits: ConnectionLimits | None = None, **backend_kwargs):
    settings = settings or ServerSettings(default_max_tokens=8, limits=LIMITS)
    backend = LocalBackend(*model_and_tok, "tiny-starling", **backend_kwargs)
    return LocalServer(create_app(backend, settings), sndbuf, limits)


def raw_request(port: int, body: dict, rcvbuf: int | None = None, headers: str = "") -> socket.socket:
    """POST /v1/chat/completions on a plain socket, nothing read yet (the caller reads, or stops reading)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"{headers}Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return sock


def read_all(sock: socket.socket, timeout: float = 120) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
