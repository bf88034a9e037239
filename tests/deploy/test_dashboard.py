"""Every metric the Grafana dashboard queries is one the server exports: no silently empty panels."""

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/pica-serve.json"
METRIC = re.compile(r"\b(pica_[a-z0-9_]+)")
PROMQL_WORDS = {"sum", "rate", "by", "le", "histogram_quantile"}


def dashboard_metrics() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    used = {}
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            for name in METRIC.findall(target["expr"]):
                used[name] = panel["title"]
    return used


def exported_sample_names(live) -> set[str]:
    text = httpx.get(live.base_url + "/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
    return names


def test_dashboard_queries_only_exported_metrics(live):
    httpx.post(f"{live.base_url}/v1/generate", json={"prompt": "fill histograms", "max_tokens": 3}, timeout=30)
    exported = exported_sample_names(live)
    used = dashboard_metrics()
    assert len(used) >= 12
    missing = {name: panel for name, panel in used.items() if name not in exported}
    assert not missing, f"dashboard panels query metrics the server does not export: {missing}"


def test_dashboard_covers_the_required_views():
    used = set(dashboard_metrics())
    required = {"pica_adapter_requests_total", "pica_http_requests_total", "pica_time_to_first_token_seconds_bucket",
                "pica_inter_token_latency_seconds_bucket", "pica_generation_tokens_total", "pica_batch_size_bucket",
                "pica_requests_waiting", "pica_kv_cache_usage_ratio", "pica_adapter_cache_hits_total",
                "pica_adapter_cache_misses_total", "pica_adapter_cache_evictions_total", "pica_adapter_swap_seconds_bucket"}
    assert required <= used, required - used


def test_grafana_provisioning_is_wired():
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    uids = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]} and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/pica-serve.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
