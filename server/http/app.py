"""`build_app(config)`: the FastAPI application. The model loads in the background at start-up, so
/health answers at once and /ready (and every /v1 route) says 503 until the engine runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from server.config import AppConfig
from server.engine.core import freeze_startup_objects
from server.http.errors import install_error_handlers
from server.http.guard import RequestGuard
from server.http.middleware import RequestAccounting
from server.http.routes import adapters, generate, openai_api, ops
from server.http.state import build_state
from server.metrics import Metrics

log = logging.getLogger(__name__)


def build_app(config: AppConfig, on_load_failed: Callable[[], None] | None = None,
              on_engine_died: Callable[[], None] | None = None) -> FastAPI:
    """`on_load_failed` runs (on the event loop) when the model or basis cannot be loaded; the CLI stops
    the server with it, so a broken start-up exits instead of answering 503 forever. `on_engine_died`
    runs (on the event loop) when the engine-core process dies, after every in-flight request got its
    error; the CLI stops the server with it and exits non-zero, so that a supervisor restarts it."""
    metrics = Metrics(config.server.max_adapter_labels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def engine_died(message: str) -> None:  # called from the core client's reader thread
            def on_loop() -> None:
                app.state.engine_error = message
                if on_engine_died is not None:
                    on_engine_died()

            loop.call_soon_threadsafe(on_loop)

        # only the split engine can die apart from this process (and only it takes the callback)
        extra = (engine_died,) if config.server.engine_process else ()
        loading = loop.run_in_executor(None, build_state, config, metrics, *extra)

        def loaded(future):
            if future.exception() is not None:
                app.state.load_error = str(future.exception())
                log.error("start-up failed: %s", future.exception(), exc_info=future.exception())
                if on_load_failed is not None:
                    on_load_failed()
            else:
                app.state.server_state = future.result()
                freeze_startup_objects()  # this process's too (the whole engine, where it runs in-process)

        loading.add_done_callback(loaded)
        yield
        if not loading.done():
            await asyncio.wait_for(asyncio.shield(loading), timeout=None)
        if app.state.server_state is not None:
            app.state.server_state.async_engine.shutdown()

    app = FastAPIOffline(  # /docs and /redoc with their assets served from the package, not a CDN
        title="pica-serve",
        version="0.1.0",
        description="Serves thousands of PiCa adapters on one base model. OpenAI-compatible; `model` names the adapter.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.metrics = metrics
    app.state.server_state = None
    app.state.load_error = None
    app.state.engine_error = None
    install_error_handlers(app)
    app.add_middleware(RequestGuard, config=config.server)  # inner: checks the key before any body is read
    app.add_middleware(RequestAccounting, metrics=metrics)  # outermost: counts every request, answers 500s itself
    for router in (ops.router, generate.router, openai_api.router, adapters.router):
        app.include_router(router)
    return app
