"""One error schema for every failure: `{"error": {"type", "message", "param"}}` with the right status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


MAX_MESSAGE_CHARS = 2000
MAX_PARAM_CHARS = 200


def clip(text: str, limit: int) -> str:
    """At most `limit` characters of a text that may echo user input (a 10 MB field name or value)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, error_type: str | None = None) -> dict:
    return {"error": {"type": error_type or ERROR_TYPES.get(status, "error"), "message": clip(message, MAX_MESSAGE_CHARS),
                      "param": None if param is None else clip(param, MAX_PARAM_CHARS)}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.error_type), status_code=exc.status)


def internal_error_response(exc: Exception) -> JSONResponse:
    """The 500 for an unexpected error (sent by server.http.middleware, which logs it)."""
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = next((err for err in errors if err.get("type") == "json_invalid"), None)
        if bad_json is not None:  # a 400 in words, as OpenAI answers
            reason = (bad_json.get("ctx") or {}).get("error", "malformed")
            position = bad_json["loc"][-1] if bad_json.get("loc") else "?"
            return JSONResponse(error_body(400, f"the request body is not valid JSON: {reason} at character {position}"),
                                status_code=400)
        problems, params = [], []
        for err in errors:
            loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path")]
            params.append(".".join(loc))
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return JSONResponse(error_body(422, "; ".join(problems), params[0] if params else None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

