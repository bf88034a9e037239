"""`--step-trace PATH`: one JSON line per engine step, to find which steps make a latency tail.

Prometheus keeps totals and histograms; a tail of a few slow steps in a thousand needs the steps themselves:
what each carried (prompt tokens, decodes), how long the device ran it and sat idle before it, whether it was
launched ahead, the host's time in the step() call and in the caller's loop before it, and the longest gap
between tokens it closed. `bench/serve_bench.py --step-trace` reads it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from server.engine.stats import StepStats


def step_record(stats: StepStats) -> dict:
    return {
        "t": round(stats.end_time, 6),
        "kind": "mixed" if stats.num_prefill_tokens else "decode",
        "prefill_tokens": stats.num_prefill_tokens,
        "decode_tokens": stats.num_decode_tokens,
        "running": stats.num_running,
        "waiting": stats.num_waiting,
        "gpu_ms": round(stats.gpu_seconds * 1000, 3),
        "idle_ms": round(stats.host_seconds * 1000, 3),
        "loop_ms": round(stats.loop_seconds * 1000, 3),
        "call_ms": round(stats.call_seconds * 1000, 3),
        "ahead": stats.launched_ahead,
        "itl_max_ms": round(max(stats.itl_seconds, default=0.0) * 1000, 3),
        "first_tokens": len(stats.ttft_seconds),
        "finished": len(stats.finished),
        "preempted": stats.num_preempted,
        "slot_misses": stats.gpu_slot_misses,
    }


class StepTrace:
    """Appends step_record(stats) lines to `path` (line-buffered: a killed server leaves whole lines)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def record(self, stats: StepStats) -> None:
        if not stats.batch_size:
            return
        line = json.dumps(step_record(stats))
        with self._lock:
            self._file.write(line + "\n")


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
