"""The compose stack validates with docker-compose for the GPU and the CPU variant."""

import subprocess
from pathlib import Path

import yaml

from tests.deploy.tools import require

ROOT = Path(__file__).resolve().parents[2]


def compose_config(*args) -> dict:
    tool = require("docker-compose")
    result = subprocess.run([tool, *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_gpu_stack_validates():
    services = compose_config()["services"]
    serve = services["pica-serve"]
    device = serve["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in serve["volumes"]} == {
        "/data/cache", "/data/adapters", "/data/hf"}
    assert serve["environment"]["PICA_ADAPTER_DIR"] == "/data/adapters"
    assert "http://127.0.0.1:8000/ready" in " ".join(serve["healthcheck"]["test"])
    assert serve["restart"] == "unless-stopped"
    # the server binds 0.0.0.0 in the container, so it needs the admin key from .env; open only on request
    raw_env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-pica-env"]
    assert raw_env["PICA_ADMIN_KEY"] == "${PICA_ADMIN_KEY:-}"
    assert raw_env["PICA_ALLOW_INSECURE_NO_AUTH"] == "${PICA_ALLOW_INSECURE_NO_AUTH:-}"
    assert {"prometheus", "grafana"} <= set(services)


def test_cpu_variant_validates_without_gpu():
    services = compose_config("--profile", "cpu")["services"]
    cpu = services["pica-serve-cpu"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["BASE_IMAGE"].startswith("python:")
    assert cpu["environment"]["PICA_DEVICE"] == "cpu"
    assert "pica-serve" in cpu["networks"]["default"]["aliases"]


def test_env_example_names_only_known_options():
    import argparse

    from server.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {a.dest.upper() for a in subparsers.choices["serve"]._actions}
    names = [line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")]
    pica = [n for n in names if n.startswith("PICA_") and not n.endswith("_HOST_PORT")]
    unknown = [n for n in pica if n[5:] not in options]
    assert not unknown, f".env.example names options the CLI does not have: {unknown}"


def test_env_file_with_the_keys_is_not_committed():
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert result.returncode == 0, ".env (which holds the keys) must be in .gitignore"
