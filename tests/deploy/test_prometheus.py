"""A real Prometheus, started with the shipped config pointed at loopback, scrapes our server."""

import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.deploy.tools import require
from tests.server.live import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_prometheus_scrapes_the_server(live, tmp_path):
    binary = require("prometheus")
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["pica-serve:8000"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{live.port}"]
    config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(3):
            response = httpx.post(f"{live.base_url}/v1/generate",
                                  json={"prompt": "scrape me", "max_tokens": 5, "ignore_eos": True}, timeout=30)
            assert response.status_code == 200
        served_tokens = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                   params={"query": "pica_generation_tokens_total"}, timeout=5).json()
                values = result["data"]["result"]
                if values and float(values[0]["value"][1]) >= 15:
                    served_tokens = float(values[0]["value"][1])
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert served_tokens is not None and served_tokens >= 15, "Prometheus never scraped the server's metrics"
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": 'up{job="pica-serve"}'}).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        process.terminate()
        process.wait(timeout=30)
