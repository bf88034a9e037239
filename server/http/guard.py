"""A pure ASGI gate in front of the routes: the API key is checked and the body's size bounded before
any of the body is read. (FastAPI reads and parses a JSON body before it runs a route's dependencies,
so without this a client with no key could make the server read a body of any size.)"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import ServerConfig
from server.http.deps import api_key_error, bearer_token
from server.http.errors import error_body

UPLOAD_PATH = "/v1/adapters"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body without (or beyond) a Content-Length passes the limit;
    FastAPI passes HTTPExceptions from body reading through to the error handlers (a 413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class RequestGuard:
    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app = app
        self.config = config

    def body_limit(self, path: str, method: str) -> int:
        return self.config.max_upload_bytes if (path, method) == (UPLOAD_PATH, "POST") else self.config.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            error = api_key_error(bearer_token(headers.get("authorization")), self.config)
            if error is not None:
                await respond(send, error.status, error_body(error.status, error.message))
                return
        limit = self.body_limit(path, scope["method"])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 413 if length.isdigit() else 400
            message = (f"request body is larger than the limit of {limit} bytes" if status == 413
                       else "Content-Length must be a number of bytes")
            await respond(send, status, error_body(status, message))
            return
        await self.app(scope, counting(receive, limit), send)


def counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises BodyTooLarge once more than `limit` body bytes arrived (chunked bodies)."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


async def respond(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
