"""Request accounting, as pure ASGI middleware: counts every request by route and status, and answers
an unhandled error with the JSON 500 itself.

Pure ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides the client's
disconnect from the route, so a non-streaming request whose client left ran to the end. And an
error handled here never reaches the server, which would close the kept-alive connection after it.
"""

from __future__ import annotations

import logging

from server.http.errors import internal_error_response
from server.metrics import Metrics

log = logging.getLogger(__name__)


class RequestAccounting:
    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as exc:
            log.exception("unhandled error on %s", scope.get("path"))
            if status is None:
                await internal_error_response(exc)(scope, receive, send_counted)
            # else a streamed response broke after it started: it ends here, unfinished
        finally:
            route = scope.get("route")
            self.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status or 500)).inc()
