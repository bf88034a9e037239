"""bench/serve_bench.py runs end to end on the demo model: server started, adapters uploaded, clients driven."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", [["--concurrency", "3", "--step-trace"], ["--request-rate", "30", "--api", "completions"],
                                  ["--concurrency", "2", "--no-stream"], ["--concurrency", "3", "--client-processes", "2"]])
def test_serve_bench_reports_every_request(tmp_path, mode):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--workdir", str(tmp_path), "--num-requests", "6",
           "--max-tokens", "5", "--num-adapters", "2", "--rank", "4", "--out", str(out), *mode]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"], report["output_tokens"]) == (6, 0, 30)  # ignore_eos: 5 tokens each
    processes = 2 if "--client-processes" in mode else 1  # each process's requests come back
    assert report["client_processes"] == len(report["client_cpu_busy"]) == processes
    engine_itl = report["engine_itl_s"]  # the engine's own gaps, from its histogram
    assert 0 < engine_itl["p50"] <= engine_itl["p90"] <= engine_itl["p99"]
    assert report["ttft_s"]["p50"] > 0 and report["request_throughput"] > 0
    assert 0 < report["ttft_first_wave_s"]["p50"] <= report["ttft_s"]["p99"]
    assert report["metrics_after"]['pica_http_requests_total{endpoint="/v1/adapters",status="201"}'] == 2  # uploaded
    generated = sum(v for k, v in report["metrics_delta"].items() if k.startswith("pica_adapter_requests_total"))
    assert generated == 6  # the server counted every request against an adapter
    steps = report["engine_steps"]  # on CPU the GPU time is 0 and the host time is the whole step
    assert steps["num_decode_steps"] >= 4 and steps["host_ms_per_decode_step"] > 0 == steps["gpu_ms_per_decode_step"]
    if "--step-trace" in mode:  # the server's per-step trace saw the steps its counters counted
        trace = report["step_trace"]
        for kind in ("decode", "mixed"):
            counted = report["metrics_delta"].get(f'pica_engine_steps_total{{kind="{kind}"}}', 0)
            assert trace.get(kind, {}).get("steps", 0) == counted
        longest = trace["longest_gaps"][0]
        assert longest["itl_max_ms"] > 0 and longest["decode_tokens"] >= 1 and longest["gap_ms"] > 0
