"""Serving benchmark: the product as users run it, `pica-serve serve` under concurrent HTTP clients.

    python bench/serve_bench.py --out bench/results/serve-demo-cpu.json                      # demo model, CPU
    python bench/serve_bench.py --model /tmp/b8/model --server-args="--dtype bfloat16" \\
        --num-adapters 64 --rank 32 --concurrency 64 --num-requests 256 --out $OUT/serve.json   # a GPU run

Starts the server as a user would (or uses `--url`), uploads `--num-adapters` random PiCa adapters
through the API (shapes from the model's config on the meta device, so the benchmark loads no
weights), then drives clients: a fixed number in flight (`--concurrency`) or Poisson arrivals
(`--request-rate`), native `/v1/generate` or OpenAI `/v1/completions`, streaming or not. Reports
request throughput, output tok/s, steady decode tok/s (while every client is in flight), TTFT and
inter-token latency p50/p90/p99, the engine's host time per decode step (from the server's step
counters: the time the GPU sat idle for the host before each step, between CUDA events; compare
`--server-args="$ENGINE --no-async-scheduling"` for the synchronous engine) and the server's own
`/metrics` before and after. vLLM's serving
benchmark is the model followed. The server runs its engine core in its own process unless
`--server-args=--engine-in-process` says otherwise (the `=`: the value starts with `--`).

Engine alone vs HTTP on the H200 (one call, the same model folder and engine limits as decode_bench;
64 streams, no adapter and 64 distinct adapters r=32; the last run is the engine in the HTTP process):

    python bench/decode_bench.py --shape llama3-8b --batches 64 --ranks 32 --num-adapters 64 --skip-peft \\
        --workdir /tmp/b8 --out $OUT/decode.json
    ENGINE="--dtype bfloat16 --rank-max 32 --max-rank 32 --max-num-seqs 64 --max-num-batched-tokens 4096 \\
        --max-model-len 320 --max-gpu-adapters 64 --gpu-memory-utilization 0.85"
    for n in 0 64; do python bench/serve_bench.py --model /tmp/b8/model --workdir /tmp/sb --server-args="$ENGINE" \\
        --num-adapters $n --rank 32 --concurrency 64 --num-requests 256 --prompt-words 35 --max-tokens 128 \\
        --client-processes 4 --out $OUT/serve-a$n.json; done   # 35 words: about 128 byte tokens
    python bench/serve_bench.py --model /tmp/b8/model --workdir /tmp/sb --server-args="$ENGINE --engine-in-process" \\
        --num-adapters 0 --concurrency 64 --num-requests 256 --prompt-words 35 --max-tokens 128 \\
        --out $OUT/serve-a0-in-process.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = "the of and to in is was for on that with as by at from his her an which or be are this have one".split()


@dataclass
class RequestRecord:
    adapter_id: str | None
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    """One entry per output token (a streamed event of k tokens gives k entries at its arrival)."""
    end: float = 0.0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--cache-dir", str(workdir / "cache"), "--adapter-dir", str(workdir / "adapters"), "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else []
    cmd += shlex.split(args.server_args)
    if args.step_trace:
        (workdir / "steps.jsonl").unlink(missing_ok=True)
        cmd += ["--step-trace", str(workdir / "steps.jsonl")]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {workdir / 'server.log'}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server was not ready within {args.start_timeout} s; see {workdir / 'server.log'}")


def adapter_shapes(model: str | None, cache_dir: Path) -> dict[str, int]:
    """Group -> out_features of the model the server runs, from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.targets import find_target_linears, group_targets
    from server.config import DEFAULT_TARGET_MODULES
    from server.demo_model import ensure_demo_model

    path = model or str(ensure_demo_model(cache_dir))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    groups = group_targets(find_target_linears(meta, DEFAULT_TARGET_MODULES), DEFAULT_TARGET_MODULES)
    return {g: info.out_features for g, info in groups.items()}


def upload_adapters(url: str, headers: dict, shapes: dict[str, int], count: int, rank: int) -> tuple[list[str], int]:
    """The adapters' ids, and how many of them the store held already (409): those the core has not read ahead
    into host memory, so each first request for one waits for its disk read."""
    import torch
    from safetensors.torch import save

    ids, kept = [], 0
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        tensors = {f"M.{g}": torch.randn(out, rank, generator=gen) * 0.01 for g, out in shapes.items()}
        config = {"method": "pica", "r": rank, "target_modules": sorted(shapes), "format_version": 2}
        files = [("files", ("adapter_config.json", json.dumps(config).encode())),
                 ("files", ("adapter_model.safetensors", save(tensors)))]
        adapter_id = f"bench-{i}"
        response = httpx.post(f"{url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, headers=headers,
                              timeout=120)
        if response.status_code not in (201, 409):  # 409: kept from an earlier run against the same store
            raise SystemExit(f"upload of {adapter_id} failed: {response.status_code} {response.text[:500]}")
        ids.append(adapter_id)
        kept += response.status_code == 409
    return ids, kept


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes (Linux /proc): the HTTP front end and its engine core."""
    def cpu(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    seconds = {"frontend": cpu(pid)}
    try:  # children of any of its threads (the core is started from a start-up thread)
        children = {int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}
        for child in children:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():  # not multiprocessing's tracker
                seconds["core"] = seconds.get("core", 0.0) + cpu(child)
    except OSError:
        pass
    return seconds


def scrape_metrics(url: str, headers: dict) -> dict[str, float]:
    """The server's pica_* samples (name{labels} -> value) at this moment."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("pica_") and " " in line and "_created" not in line.split("{")[0]:  # not timestamps
            name, value = line.rsplit(" ", 1)
            try:
                samples[name] = float(value)
            except ValueError:
                pass
    return samples


async def send(client: httpx.AsyncClient, args, record: RequestRecord, prompt: str) -> None:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": not args.no_stream}
    if args.api == "generate":
        path, body = "/v1/generate", {**body, "adapter_id": record.adapter_id}
    else:
        path, body = "/v1/completions", {**body, "model": record.adapter_id or args.base_name,
                                         "stream_options": {"include_usage": True} if not args.no_stream else None}
        body = {k: v for k, v in body.items() if v is not None}
    record.start = time.perf_counter()
    try:
        if args.no_stream:
            response = await client.post(path, json=body)
            response.raise_for_status()
            now = time.perf_counter()
            record.token_times = [now] * response.json()["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", path, json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event, now = json.loads(line[6:]), time.perf_counter()
                    if args.api == "generate":
                        record.token_times += [now] * len(event.get("token_ids", []))
                    elif event.get("choices") and event["choices"][0].get("text"):
                        record.token_times.append(now)  # a text delta; the usage event has the true count
                    elif event.get("usage") and not event.get("choices"):
                        missing = event["usage"]["completion_tokens"] - len(record.token_times)
                        record.token_times += [now] * max(0, missing)
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    record.end = time.perf_counter()


def plan_requests(args, adapter_ids: list[str]) -> list[tuple[RequestRecord, str]]:
    """Every request's adapter and prompt, fixed by the seed (the same whatever the number of client processes)."""
    rng = random.Random(args.seed)
    choices = adapter_ids or [None]
    records = [RequestRecord(rng.choice(choices) if args.zipf is None else choices[min(len(choices), int(
        np.random.default_rng(args.seed + i).zipf(args.zipf))) - 1]) for i in range(args.num_requests)]
    return [(record, " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))) for record in records]


async def drive(url: str, headers: dict, args, requests: list[tuple[RequestRecord, str]], concurrency: int,
                request_rate: float | None, seed: int) -> list[RequestRecord]:
    limits = httpx.Limits(max_connections=concurrency or len(requests), max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.request_timeout, limits=limits) as client:
        if request_rate:  # Poisson arrivals: exponential gaps, every request in flight once sent
            rng, tasks = random.Random(seed), []
            for record, prompt in requests:
                tasks.append(asyncio.create_task(send(client, args, record, prompt)))
                await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        else:  # a fixed number of clients, each sending its next request when the last one ends
            queue = requests[::-1]

            async def client_loop():
                while queue:
                    record, prompt = queue.pop()
                    await send(client, args, record, prompt)

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return [record for record, _ in requests]


def client_shard(url: str, headers: dict, args, requests, concurrency: int, request_rate: float | None,
                 seed: int) -> tuple[list[RequestRecord], float]:
    """One client process's requests, and the share of the run its CPU was busy (near 1: the client, not the
    server, may be what the measured gaps show)."""
    wall, cpu = time.perf_counter(), time.process_time()
    records = asyncio.run(drive(url, headers, args, requests, concurrency, request_rate, seed))
    return records, (time.process_time() - cpu) / (time.perf_counter() - wall)


def run_clients(url: str, headers: dict, args, adapter_ids: list[str]) -> tuple[list[RequestRecord], list[float]]:
    """The requests spread over `--client-processes` processes (each its own event loop and its share of the
    concurrency or rate), so that parsing 64 streams' events does not bound what is measured. Token times are
    time.perf_counter(), CLOCK_MONOTONIC on Linux: one clock for every process."""
    requests = plan_requests(args, adapter_ids)
    n = max(1, min(args.client_processes, args.concurrency or len(requests), len(requests)))
    shares = [(args.concurrency // n + (i < args.concurrency % n), args.request_rate and args.request_rate / n)
              for i in range(n)]
    if n == 1:
        records, busy = client_shard(url, headers, args, requests, *shares[0], args.seed)
        return records, [busy]
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(client_shard, url, headers, args, requests[i::n], *shares[i], args.seed + i)
                   for i in range(n)]
        results = [future.result() for future in futures]
    return [record for records, _ in results for record in records], [busy for _, busy in results]


def engine_step_times(delta: dict[str, float]) -> dict[str, float]:
    """Per decode-only step over the run, in ms: host time (the GPU idle for the host) and GPU time."""
    steps = delta.get('pica_engine_steps_total{kind="decode"}', 0.0)
    if not steps:
        return {}
    return {"num_decode_steps": int(steps),
            "host_ms_per_decode_step": 1000 * delta.get('pica_engine_step_host_seconds_total{kind="decode"}', 0.0) / steps,
            "gpu_ms_per_decode_step": 1000 * delta.get('pica_engine_step_gpu_seconds_total{kind="decode"}', 0.0) / steps}


def step_trace_summary(path: Path, top: int = 12) -> dict:
    """The server's --step-trace over the run: per kind of step the device time's spread, the idle time before
    it, the host's time in and between step() calls and how many were launched ahead; the steps that closed the longest gaps between tokens, each with what
    it carried and the gap from the step before it."""
    from server.step_trace import read_trace

    steps = read_trace(path)
    for prev, step in zip([None] + steps, steps):
        step["gap_ms"] = round(1000 * (step["t"] - prev["t"]), 3) if prev else None
    report = {}
    for kind in ("decode", "mixed"):
        of_kind = [s for s in steps if s["kind"] == kind]
        if of_kind:
            report[kind] = {"steps": len(of_kind), "ahead": sum(s["ahead"] for s in of_kind),
                            "gpu_ms": percentiles([s["gpu_ms"] for s in of_kind]),
                            "idle_ms": percentiles([s["idle_ms"] for s in of_kind]),
                            "call_ms": percentiles([s["call_ms"] for s in of_kind]),
                            "loop_ms": percentiles([s["loop_ms"] for s in of_kind]),
                            "gpu_ms_max": max(s["gpu_ms"] for s in of_kind)}
    report["longest_gaps"] = sorted(steps, key=lambda s: -s["itl_max_ms"])[:top]
    return report


def histogram_percentiles(delta: dict[str, float], name: str) -> dict[str, float]:
    """p50/p90/p99 of a Prometheus histogram over the run, interpolated within buckets (histogram_quantile)."""
    buckets = sorted((float(key.split('le="')[1].split('"')[0]), count) for key, count in delta.items()
                     if key.startswith(name + "_bucket{") and 'le="+Inf"' not in key)
    total = delta.get(name + "_count", 0.0)
    if not buckets or not total:
        return {}
    result = {}
    for q in (50, 90, 99):
        rank, lower, below = total * q / 100, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                result[f"p{q}"] = lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
                break
            lower, below = upper, count
    return result


def percentiles(values) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)} | {"mean": float(np.mean(values))}


def summarize(records: list[RequestRecord], concurrency: int) -> dict:
    done = [r for r in records if r.error is None and r.token_times]
    start, end = min(r.start for r in records), max(r.end for r in records)
    times = np.sort(np.concatenate([r.token_times for r in done])) if done else np.zeros(0)
    report = {"num_requests": len(records), "completed": len(done), "failed": len(records) - len(done),
              "errors": sorted({r.error for r in records if r.error})[:5], "duration_s": end - start,
              "request_throughput": len(done) / (end - start), "output_tokens": int(times.size),
              "output_tok_s": times.size / (end - start),
              "ttft_s": percentiles([r.token_times[0] - r.start for r in done]),
              "itl_s": percentiles(np.concatenate([np.diff(r.token_times) for r in done]) if done else [])}
    # steady decode: from when the first `concurrency` requests all have their first token to when the first
    # of them ends, every client is in flight and decoding
    first = sorted(done, key=lambda r: r.start)[:concurrency]
    if first:  # the first wave: `concurrency` fresh requests at once (compare with the engine's prefill of that batch)
        report["ttft_first_wave_s"] = percentiles([r.token_times[0] - r.start for r in first])
        lo, hi = max(r.token_times[0] for r in first), min(r.end for r in first)
        if hi > lo:
            in_window = np.searchsorted(times, hi) - np.searchsorted(times, lo)
            report["steady_decode_tok_s"] = float(in_window / (hi - lo))
            report["steady_window_s"] = hi - lo
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=None, help="model folder for the started server (default: the demo model)")
    parser.add_argument("--server-args", default="", help="more `pica-serve serve` options, one string (--server-args=\"--dtype ...\")")
    parser.add_argument("--workdir", type=Path, default=None, help="cache, store and server log (default: a temp dir)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--admin-key", default=None)
    parser.add_argument("--base-name", default=None, help="the base model's name for /v1/completions")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=None, help="adapter popularity exponent (default: uniform)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8, help="clients in flight (fixed-concurrency mode)")
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead")
    parser.add_argument("--api", default="generate", choices=("generate", "completions"))
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-processes", type=int, default=1,
                        help="client processes sharing the concurrency (or rate); one event loop parses ~9k events/s")
    parser.add_argument("--step-trace", action="store_true",
                        help="the started server writes --step-trace <workdir>/steps.jsonl; the report sums it up")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pica-serve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)  # a --workdir that does not exist yet (the first run of a call)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args, workdir)
    headers = {"Authorization": f"Bearer {args.admin_key or args.api_key}"} if (args.admin_key or args.api_key) else {}
    try:
        args.base_name = args.base_name or httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        start = time.perf_counter()
        ids, kept = upload_adapters(url, headers, adapter_shapes(args.model, workdir / "cache"), args.num_adapters, args.rank)
        upload_s = time.perf_counter() - start
        before = scrape_metrics(url, headers)
        watch = proc is not None and Path("/proc").is_dir()
        cpu_before, wall = server_cpu_seconds(proc.pid) if watch else {}, time.perf_counter()
        records, client_busy = run_clients(url, headers, args, ids)
        wall = time.perf_counter() - wall
        server_busy = {k: round((v - cpu_before.get(k, 0.0)) / wall, 3)
                       for k, v in (server_cpu_seconds(proc.pid) if watch else {}).items()}
        after = scrape_metrics(url, headers)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    change = {k: v - before.get(k, 0.0) for k, v in after.items()}  # every series (histogram buckets need all)
    delta = {k: v for k, v in change.items() if v}
    report = {"command": " ".join(sys.argv), "mode": "poisson" if args.request_rate else "fixed-concurrency",
              **{k: getattr(args, k) for k in ("api", "concurrency", "request_rate", "num_adapters", "rank",
                                                "prompt_words", "max_tokens", "zipf")},
              "stream": not args.no_stream, "upload_s": upload_s, "adapters_already_stored": kept,
              "client_processes": len(client_busy), "client_cpu_busy": [round(b, 3) for b in client_busy],
              "server_cpu_busy": server_busy, **summarize(records, args.concurrency),
              "engine_steps": engine_step_times(delta),
              # the same gaps as the engine core saw them (its outputs, before IPC, SSE and the clients)
              "engine_itl_s": histogram_percentiles(change, "pica_inter_token_latency_seconds"),
              "metrics_delta": delta, "metrics_after": after}
    if args.step_trace and proc is not None:
        report["step_trace"] = step_trace_summary(workdir / "steps.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("metrics_after", "metrics_delta")}, indent=1))


if __name__ == "__main__":
    main()
