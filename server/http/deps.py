"""Route dependencies: readiness and API-key checks (the same checks the request guard makes before
a body is read; declared here too so that OpenAPI shows the bearer scheme on every /v1 route)."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.config import ServerConfig
from server.http.errors import APIError
from server.http.state import ServerState

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`: the api key, or the admin key "
                    "for adapter uploads and deletes (needed only when the server was started with keys)")


def get_state(request: Request) -> ServerState:
    """The loaded services; 503 while the model and basis are still loading (or failed to)."""
    if request.app.state.engine_error is not None:
        raise APIError(503, "the engine stopped; the server is restarting")
    state = request.app.state.server_state
    if state is None:  # the cause (which may name paths) is in the server log only
        if request.app.state.load_error is not None:
            raise APIError(503, "model failed to load; the server log says why")
        raise APIError(503, "the model is still loading; retry shortly")
    return state


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


def api_key_error(token: str | None, cfg: ServerConfig) -> APIError | None:
    """Every /v1 route: when an api key is set, the api key or the admin key is needed."""
    if cfg.api_key is None or _matches(token, cfg.api_key) or _matches(token, cfg.admin_key):
        return None
    return APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else bearer_token(request.headers.get("authorization"))


def require_api_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    error = api_key_error(_token(request, credentials), request.app.state.config.server)
    if error is not None:
        raise error


def require_admin_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """Adapter writes and deletes: the admin key when set, else the api key when set."""
    cfg = request.app.state.config.server
    key = cfg.admin_key or cfg.api_key
    if key is None:
        return
    token = _token(request, credentials)
    if _matches(token, key):
        return
    if token is not None and _matches(token, cfg.api_key):
        raise APIError(403, "adapter uploads and deletes need the admin key")
    raise APIError(401, "missing or invalid admin key (send 'Authorization: Bearer <key>')")
