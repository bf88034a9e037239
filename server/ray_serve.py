"""Scale-out on Ray Serve: replicas of the whole server, each adapter's requests routed to a replica that
holds it, by Ray's model multiplexing (we write no router).

The ingress reads the adapter a request names (`model` on the OpenAI routes, `adapter_id` on
/v1/generate) and calls a replica with it as the multiplexed model id, which is what Ray's router
uses to prefer a replica that has that id loaded. Each replica runs our whole HTTP app in-process
(the same routes, errors, auth and metrics as `pica-serve serve`), so its engine batches across
adapters exactly as a single server does; Ray batches nothing. `@serve.multiplexed` only makes an
adapter host-resident (its small tensors, read from the shared store); the base model and the basis
are loaded once per replica. Replicas share one adapter store (a shared folder), so an upload or
delete through any of them is seen by all at their next request for that adapter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import uuid

from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse

from server.config import AppConfig

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-pica-replica"
"""Response header naming the replica that answered (tests and operators see the routing with it)."""


def adapter_of(method: str, path: str, body: bytes) -> str:
    """The adapter a request names ('' for none or an unreadable body: the replica answers those)."""
    if method != "POST" or path not in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        return ""
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    value = payload.get("adapter_id" if path == "/v1/generate" else "model") if isinstance(payload, dict) else None
    return value if isinstance(value, str) else ""


async def call_app(app, method: str, path: str, query: bytes, headers: list, body: bytes, replica: str):
    """Run one HTTP request through an ASGI app in-process: yields the response's status and headers,
    then its body chunks as the app sends them (SSE streams stay streams). If the caller stops
    iterating (its client left), the app sees a disconnect, as under uvicorn."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("ray-serve", 0)}
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, messages.put))
    try:
        while True:
            message = await messages.get()
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "replica": replica,
                       "headers": [(k.decode(), v.decode()) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait_for(asyncio.shield(task), timeout=30)


def replica_deployment(max_adapters_per_replica: int):
    """The replica deployment class, with the multiplexing limit (fixed at class definition by Ray)."""

    @serve.deployment(name="PicaReplica")
    class PicaReplica:
        def __init__(self, config: AppConfig):
            from server.http.app import build_app
            from server.http.state import build_state

            # the engine runs in the replica's own process: Ray already gives each replica a process, and
            # `activate` fills this process's host cache
            config = dataclasses.replace(config, server=dataclasses.replace(config.server, engine_process=False))
            self.app = build_app(config)
            # loaded here, not in the app's lifespan: Ray routes to a replica once its constructor returns
            self.state = build_state(config, self.app.state.metrics)
            self.app.state.server_state = self.state
            self.name = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"

        @serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)
        async def activate(self, adapter_id: str):
            """Make an adapter host-resident here; an unknown id is left to the app's own 404."""
            try:
                return await run_in_threadpool(self.state.host_cache.get, adapter_id)
            except Exception:  # noqa: BLE001 - unknown, damaged or the base model: the request itself says why
                return None

        async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            adapter_id = serve.get_multiplexed_model_id()
            if adapter_id:
                await self.activate(adapter_id)
            async for item in call_app(self.app, method, path, query, headers, body, self.name):
                yield item

        def __del__(self):
            self.state.async_engine.shutdown()

    return PicaReplica


@serve.deployment(name="PicaIngress")
class PicaIngress:
    """Maps the adapter a request names to Ray's multiplexed model id and relays the replica's answer."""

    def __init__(self, replica):
        self.replica = replica

    async def __call__(self, request: Request):
        body = await request.body()
        path = request.url.path
        adapter_id = adapter_of(request.method, path, body)
        handle = self.replica.options(stream=True, multiplexed_model_id=adapter_id)
        stream = handle.forward.remote(request.method, path, request.url.query.encode(), request.headers.raw, body)
        start = await stream.__anext__()
        headers = {k: v for k, v in start["headers"] if k.lower() != "content-length"}
        headers[REPLICA_HEADER] = start["replica"]

        async def chunks():
            async for chunk in stream:
                yield chunk

        return StreamingResponse(chunks(), status_code=start["status"], headers=headers)


def build_ray_app(config: AppConfig, num_replicas: int | str = 1, max_adapters_per_replica: int = 16,
                  replica_cpus: float = 1.0, replica_gpus: float = 0.0, autoscaling: dict | None = None):
    """The Ray Serve application: the ingress in front of `num_replicas` replicas (or `autoscaling`, Ray's
    autoscaling_config: min_replicas, max_replicas, target_ongoing_requests)."""
    replica = replica_deployment(max_adapters_per_replica).options(
        num_replicas=None if autoscaling else num_replicas, autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=config.engine.max_num_seqs + config.engine.max_queue)
    return PicaIngress.options(ray_actor_options={"num_cpus": min(replica_cpus, 0.25)}).bind(replica.bind(config))


def app_builder(args: dict):
    """For `serve run server.ray_serve:app_builder key=value ...` (and serve config files): the keys are
    `pica-serve ray`'s options with underscores (model, replicas, max_adapters_per_replica, ...)."""
    from server.cli import build_parser, ray_app_from_args

    argv = ["ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return ray_app_from_args(build_parser().parse_args(argv))
