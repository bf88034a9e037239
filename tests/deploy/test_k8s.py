"""deploy/k8s validates offline, and its pieces point at each other and at the server's real endpoints.

Core kinds are checked strictly (unknown fields rejected) against Kubernetes' own schemas, which
kubernetes-validate ships; the InferencePool against the openAPIV3Schema of its CRD, vendored from the
Gateway API Inference Extension's v1.6.0 release (its CEL rules need an API server and are not run here).
"""

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = Path(__file__).parent / "schemas" / "inferencepools.inference.networking.k8s.io-v1.6.0.yaml"
KUBERNETES_VERSION = "1.33.0"


def manifests() -> list[dict]:
    docs = [doc for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    return docs


def crd_schema(api_version: str) -> dict:
    crd = yaml.safe_load(CRD.read_text())
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], api_version
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{api_version} is not served by the CRD (served: {sorted(served)})"
    return served[version]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("doc", manifests(), ids=lambda doc: doc["kind"])
def test_each_manifest_validates(doc):
    if doc["kind"] == "InferencePool":
        jsonschema.Draft7Validator(crd_schema(doc["apiVersion"])).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_pieces_fit_together():
    by_kind = {doc["kind"]: doc for doc in manifests()}
    assert {"Deployment", "Service", "InferencePool"} <= set(by_kind)
    deployment, service, pool = by_kind["Deployment"], by_kind["Service"], by_kind["InferencePool"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pool["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items(), selector
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    assert container["args"][-2:] == ["--port", str(ports["http"])] and "0.0.0.0" in container["args"]
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["PICA_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"
    assert int(env["PICA_MAX_GPU_ADAPTERS"]["value"]) > 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/data/cache", "/data/adapters", "/data/hf"}  # the image's volumes and PICA_* dirs
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the Dockerfile's pica user


def test_the_probes_and_metrics_are_real_routes(live):
    """The paths the manifests name answer on a server (/ready once loaded, /metrics open, no key)."""
    import httpx

    pod = next(doc for doc in manifests() if doc["kind"] == "Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    for path in paths | {pod["metadata"]["annotations"]["prometheus.io/path"]}:
        assert httpx.get(live.base_url + path).status_code == 200, path
