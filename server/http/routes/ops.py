"""Operations endpoints, open without a key: /health (liveness), /ready (readiness), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.http.errors import error_body

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health():
    """The process is up (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """200 once the model and basis are loaded and the engine runs; 503 before, if loading failed, or once the
    engine-core process has died."""
    if request.app.state.engine_error is not None:  # the engine core died: this server is on its way out
        return JSONResponse(error_body(503, "the engine stopped; the server log says why"), status_code=503)
    state = request.app.state.server_state
    if state is None:  # open to anyone: the cause (which may name paths) is in the server log only
        failed = request.app.state.load_error is not None
        message = "model failed to load; the server log says why" if failed else "the model is still loading"
        return JSONResponse(error_body(503, message), status_code=503)
    return {"status": "ready", "model": state.model_name, "basis_checksum": state.basis.checksum}


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    """Every `pica_` metric, for Prometheus."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
