"""Route dependencies: readiness and API-key checks."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.http.errors import APIError
from server.http.state import ServerState


def get_state(request: Request) -> ServerState:
    """The loaded services; 503 while the model and basis are still loading (or failed to)."""
    state = request.app.state.server_state
    if state is None:  # the cause (which may name paths) is in the server log only
        if request.app.state.load_error is not None:
            raise APIError(503, "model failed to load; the server log says why")
        raise APIError(503, "the model is still loading; retry shortly")
    return state


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


def require_api_key(request: Request) -> None:
    """Every /v1 route: when an api key (or admin key) is set, a matching bearer token is needed."""
    cfg = request.app.state.config.server
    if cfg.api_key is None:
        return
    token = _bearer(request)
    if not (_matches(token, cfg.api_key) or _matches(token, cfg.admin_key)):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")


def require_admin_key(request: Request) -> None:
    """Adapter writes and deletes: the admin key when set, else the api key when set."""
    cfg = request.app.state.config.server
    key = cfg.admin_key or cfg.api_key
    if key is None:
        return
    token = _bearer(request)
    if _matches(token, key):
        return
    if token is not None and _matches(token, cfg.api_key):
        raise APIError(403, "adapter uploads and deletes need the admin key")
    raise APIError(401, "missing or invalid admin key (send 'Authorization: Bearer <key>')")
