"""Ray Serve scale-out on CPU: two replicas of the demo-sized server behind Ray's multiplexing router."""

import os
import time
from collections import defaultdict

import httpx
import pytest

from tests.helpers import app_config, write_random_adapter

if os.environ.get("CI") != "true":
    pytest.importorskip("ray.serve")
from ray import serve  # noqa: E402  (in CI a missing Ray is a failure, not a skip)

from server.ray_serve import REPLICA_HEADER, adapter_of, build_ray_app  # noqa: E402

ADAPTERS = ("a0", "a1", "a2", "a3")


@pytest.fixture(scope="module")
def ray_server(server_root, tmp_path_factory):
    import ray

    from tests.server.live import free_port

    port = free_port()
    root = tmp_path_factory.mktemp("ray")
    config = app_config(server_root, adapter_dir=root / "adapters")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_ray_app(config, num_replicas=2, max_adapters_per_replica=2, replica_cpus=0.5),
                  name="pica-serve", route_prefix="/")
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()
        ray.shutdown()


def upload(url, folder, adapter_id):
    files = [("files", (name, (folder / name).read_bytes())) for name in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(f"{url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, timeout=60)


def generate(url, adapter_id, prompt):
    return httpx.post(f"{url}/v1/generate", timeout=60, json={"prompt": prompt, "adapter_id": adapter_id,
                                                                "max_tokens": 6, "temperature": 0, "ignore_eos": True})


def test_the_ingress_reads_the_adapter_a_request_names():
    assert adapter_of("POST", "/v1/generate", b'{"prompt": "x", "adapter_id": "a1"}') == "a1"
    assert adapter_of("POST", "/v1/chat/completions", b'{"model": "a2", "messages": []}') == "a2"
    assert adapter_of("POST", "/v1/completions", b"not json") == ""
    assert adapter_of("GET", "/v1/models", b"") == ""


def test_each_adapter_stays_on_one_replica_and_answers_as_a_single_server(ray_server, live, tmp_path):
    url, _ = ray_server
    for i, adapter_id in enumerate(ADAPTERS):
        folder = write_random_adapter(tmp_path / adapter_id, live.state.basis, r=4, seed=i)
        assert upload(url, folder, adapter_id).status_code == 201  # through any replica: the store is shared
        assert upload(live.base_url, folder, adapter_id).status_code == 201  # the single server to compare with
    replicas = defaultdict(set)
    for adapter_id in ADAPTERS:  # place each adapter, then give Ray's router time to learn where it went
        replicas[adapter_id].add(generate(url, adapter_id, "warm up").headers[REPLICA_HEADER])
        time.sleep(3)  # the replica reports its loaded ids to Ray's controller, which tells the router
    for k in range(40):
        adapter_id, prompt = ADAPTERS[k % 4], f"question {k % 5}:"
        response = generate(url, adapter_id, prompt)
        assert response.status_code == 200, response.text
        replicas[adapter_id].add(response.headers[REPLICA_HEADER])
        assert response.json()["text"] == generate(live.base_url, adapter_id, prompt).json()["text"]
    # two adapters fit a replica (max_adapters_per_replica=2): four need both, and none moves once placed
    assert all(len(r) == 1 for r in replicas.values()), dict(replicas)
    assert len(set().union(*replicas.values())) == 2

    streamed = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "a1", "prompt": "question 1:", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert streamed.headers[REPLICA_HEADER] in replicas["a1"]


def test_a_delete_through_one_replica_reaches_all(ray_server, live, tmp_path):
    url, _ = ray_server
    folder = write_random_adapter(tmp_path / "gone", live.state.basis, r=4, seed=9)
    assert upload(url, folder, "gone").status_code == 201
    served_by = {generate(url, "gone", "hi").headers[REPLICA_HEADER] for _ in range(3)}
    assert httpx.delete(f"{url}/v1/adapters/gone", timeout=30).status_code in (200, 204)
    for _ in range(6):  # whichever replica a request reaches, the adapter is gone
        response = generate(url, "gone", "hi")
        assert response.status_code == 404, (served_by, response.text)
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200


def test_the_serve_config_file_builds_the_same_application(tmp_path):
    import yaml
    from ray.serve import Application

    from server.ray_serve import app_builder

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = yaml.safe_load(open(os.path.join(root, "deploy", "ray", "serve-config.yaml")))
    (application,) = config["applications"]
    assert application["import_path"] == "server.ray_serve:app_builder"
    args = {**application["args"], "adapter_dir": str(tmp_path / "a"), "cache_dir": str(tmp_path / "c")}
    assert isinstance(app_builder(args), Application)
    with pytest.raises(SystemExit):  # an unknown key is refused as the CLI refuses it
        app_builder({**args, "gpus_per_replica": 1})
