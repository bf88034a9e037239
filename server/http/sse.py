"""Server-sent events framing, as OpenAI clients read it."""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse

from server.http.errors import APIError, error_body
from server.http.state import engine_error

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(events) -> StreamingResponse:
    """Stream an async iterator of events; an error after the stream started becomes an error event."""

    async def guarded():
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - the status line is already sent
            error = engine_error(exc) or APIError(500, f"generation failed: {exc}")
            yield sse_event(error_body(error.status, error.message, error.param, error.error_type))

    return StreamingResponse(
        guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
