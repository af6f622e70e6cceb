"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure the server answers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("medtune.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def timeout_error() -> APIError:
    return APIError(504, "the request took longer than the server's timeout (--request-timeout)",
                    type="server_error", code="timeout")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)  # unknown routes (404), wrong methods (405)
    async def http_error(_: Request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code), headers=exc.headers).response()

    # Starlette raises ClientDisconnect when the client leaves while its body is being read; left to the
    # catch-all below, every such client cost a 500 and uvicorn's traceback in the log. It is one line.
    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect):
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s disconnected while sending %s %s: nothing to answer", client, request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it

    # Anything else: Starlette still re-raises it after this answer, so uvicorn logs the traceback; the client
    # gets no internals.
    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        return APIError(500, "internal server error", type="server_error", code="internal_error").response()
