import json
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

from adapters.format import AdapterExpectation, load_adapter_dir
from adapters.layer import attach_adapters
from cache.basis_cache import BasisCache
from server.cli import main
from server.config import ModelConfig
from server.model_loader import load_model
from tests.helpers import build_tiny_model, write_random_adapter


def cli_args(cmd, model_dir, tmp_path, *extra):
    return [cmd, "--model", str(model_dir), "--device", "cpu", "--rank-max", "8", "--cache-dir", str(tmp_path / "c"), *extra]


def test_precompute_then_cached(tmp_path, capsys):
    model_dir = build_tiny_model(tmp_path / "m")
    assert main(cli_args("precompute", model_dir, tmp_path)) == 0
    assert "computed" in capsys.readouterr().out
    assert main(cli_args("precompute", model_dir, tmp_path)) == 0
    assert "loaded" in capsys.readouterr().out


def test_merge_writes_a_plain_model_equal_to_the_adapted_one(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", "qwen2")
    assert main(cli_args("precompute", model_dir, tmp_path)) == 0
    cfg = ModelConfig(model=str(model_dir), device="cpu", rank_max=8, cache_dir=tmp_path / "c")
    loaded = load_model(cfg)
    basis = BasisCache(cfg.basis_dir).load_or_compute(loaded.model, cfg.target_modules, 8, progress=False)
    assert basis.source == "loaded"
    adapter_dir = write_random_adapter(tmp_path / "a", basis, r=8, seed=5)
    out = tmp_path / "merged"
    assert main(cli_args("merge", model_dir, tmp_path, "--adapter", str(adapter_dir), "--out", str(out))) == 0

    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 250, (1, 9))
    with torch.no_grad():
        base_logits = loaded.model(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    adapted = attach_adapters(loaded.model, basis, num_slots=1, max_rank=8)
    adapted.slot_stacks.write(0, load_adapter_dir(adapter_dir, AdapterExpectation.from_basis(basis)).slot_tensors())
    adapted.slot_index.set([0] * 9)
    with torch.no_grad():
        torch.testing.assert_close(merged_logits, adapted.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert (base_logits - merged_logits).abs().max() > 1e-2


def test_merge_refuses_invalid_adapter(tmp_path, capsys):
    model_dir = build_tiny_model(tmp_path / "m")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"method": "pica", "r": 99, "target_modules": ["q_proj"]}))
    (bad / "adapter_model.safetensors").write_bytes(b"nope")
    code = main(cli_args("merge", model_dir, tmp_path, "--adapter", str(bad), "--out", str(tmp_path / "o")))
    err = capsys.readouterr().err
    assert code == 2
    assert "r=99 exceeds the basis rank 8" in err and "not a readable safetensors file" in err
    assert not (tmp_path / "o").exists()


def test_options_default_from_pica_env(monkeypatch):
    import pytest

    from server.cli import app_config, apply_env_defaults, build_parser

    monkeypatch.setenv("PICA_MAX_GPU_ADAPTERS", "7")
    monkeypatch.setenv("PICA_MODEL", "/models/x")
    monkeypatch.setenv("PICA_PORT", "9001")
    parser = build_parser()
    apply_env_defaults(parser)
    cfg = app_config(parser.parse_args(["serve"]))
    assert (cfg.engine.max_gpu_adapters, cfg.model.model, cfg.server.port) == (7, "/models/x", 9001)
    assert app_config(parser.parse_args(["serve", "--port", "9002"])).server.port == 9002
    assert app_config(parser.parse_args(["serve"])).engine.adapter_pool_ranks is None  # every slot at --max-rank
    monkeypatch.setenv("PICA_ADAPTER_POOL_RANKS", "4096")
    parser = build_parser()
    apply_env_defaults(parser)
    assert app_config(parser.parse_args(["serve"])).engine.adapter_pool_ranks == 4096
    with pytest.raises(ValueError, match="less than max_rank"):
        app_config(parser.parse_args(["serve", "--max-rank", "256", "--adapter-pool-ranks", "128"]))


def test_async_scheduling_flag_and_env(monkeypatch, capsys):
    import pytest

    from server.cli import app_config, apply_env_defaults, build_parser

    parser = build_parser()
    apply_env_defaults(parser)
    assert app_config(parser.parse_args(["serve"])).engine.async_scheduling is None  # the device decides
    assert app_config(parser.parse_args(["serve", "--async-scheduling"])).engine.async_scheduling is True
    assert app_config(parser.parse_args(["serve", "--no-async-scheduling"])).engine.async_scheduling is False
    for value, expected in (("0", False), ("on", True), ("auto", None)):
        monkeypatch.setenv("PICA_ASYNC_SCHEDULING", value)
        parser = build_parser()
        apply_env_defaults(parser)
        assert app_config(parser.parse_args(["serve"])).engine.async_scheduling is expected, value
    monkeypatch.setenv("PICA_ASYNC_SCHEDULING", "maybe")  # not read as false: refused, naming the variable
    with pytest.raises(SystemExit):
        apply_env_defaults(build_parser())
    assert "$PICA_ASYNC_SCHEDULING='maybe' is not one of" in capsys.readouterr().err


def test_help_shows_every_option_with_help_and_defaults(capsys):
    import argparse

    import pytest

    from server.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        undocumented = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
        assert not undocumented, f"{name}: options without help {undocumented}"
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: 127.0.0.1)" in out and "(default: None)" not in out


def test_version_and_log_level_after_the_subcommand(capsys, monkeypatch):
    import pytest

    from server import cli

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("pica-serve ")
    parser = cli.build_parser()
    assert parser.parse_args(["precompute", "--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "warning", "precompute"]).log_level == "WARNING"
    assert parser.parse_args(["precompute"]).log_level == "INFO"


def refuse_to_serve(monkeypatch):
    """A serve that gets as far as running the server fails the test at once instead of blocking it."""
    import uvicorn

    def serve(self, *args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(uvicorn.Server, "run", serve)


def test_serve_with_a_missing_model_folder_exits_with_a_clear_message(tmp_path, capsys, monkeypatch):
    import pytest

    from server.model_loader import ModelNotFoundError

    refuse_to_serve(monkeypatch)
    missing = tmp_path / "no-such-model"
    assert main(cli_args("serve", missing, tmp_path)) == 2
    assert f"model folder {missing} does not exist" in capsys.readouterr().err
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(ModelConfig(model=str(missing), device="cpu", cache_dir=tmp_path / "c"))


def test_a_failed_start_up_stops_the_server(tmp_path):
    import threading

    from server.config import AppConfig
    from server.http.app import build_app
    from tests.server.live import LiveServer

    failed = threading.Event()
    config = AppConfig(model=ModelConfig(model=str(tmp_path / "gone"), device="cpu", cache_dir=tmp_path / "c"))
    server = LiveServer(build_app(config, on_load_failed=failed.set)).start()
    try:
        assert failed.wait(60)
        ready = httpx.get(server.base_url + "/ready")
        assert ready.status_code == 503 and "model failed to load" in ready.text
        assert str(tmp_path) not in ready.text  # /ready is open to anyone: no paths
    finally:
        server.__exit__(None, None, None)


def test_serve_refuses_an_open_non_loopback_bind(tmp_path, capsys, monkeypatch):
    from server.cli import app_config, build_parser

    refuse_to_serve(monkeypatch)
    model_dir = build_tiny_model(tmp_path / "m")
    assert main(cli_args("serve", model_dir, tmp_path, "--host", "0.0.0.0")) == 2
    assert "refusing to listen on 0.0.0.0 without an admin key" in capsys.readouterr().err
    parser = build_parser()
    assert app_config(parser.parse_args(["serve", "--host", "0.0.0.0", "--admin-key", "k"])).server.admin_key == "k"
    assert app_config(parser.parse_args(["serve", "--host", "0.0.0.0", "--allow-insecure-no-auth"])).server.host == "0.0.0.0"
    monkeypatch.setenv("PICA_ALLOW_INSECURE_NO_AUTH", "0")
    from server.cli import apply_env_defaults

    apply_env_defaults(parser)
    assert parser.parse_args(["serve"]).allow_insecure_no_auth is False
def test_adapter_flags_provision_folders(tmp_path, capsys):
    import pytest

    from server.cli import app_config, build_parser

    args = build_parser().parse_args(["serve", "--adapter", "a=/x/a", "--adapter", "b-2=rel/b"])
    assert app_config(args).server.adapters == (("a", Path("/x/a")), ("b-2", Path("rel/b")))
    for bad in (".hidden=/x", "noequals", "a="):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--adapter", bad])
        assert "--adapter" in capsys.readouterr().err


def test_merge_of_a_peft_lora_folder_equals_peft_forward(tmp_path, capsys):
    from peft import LoraConfig

    from tests.helpers import save_peft_adapter

    model_dir = build_tiny_model(tmp_path / "m")
    peft_model, folder = save_peft_adapter(model_dir, tmp_path / "lora", LoraConfig(
        r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]), seed=3)  # r above --rank-max
    out = tmp_path / "merged"
    assert main(cli_args("merge", model_dir, tmp_path, "--adapter", str(folder), "--out", str(out))) == 0
    ids = torch.randint(0, 250, (1, 9))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        torch.testing.assert_close(merged, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert main(cli_args("export", model_dir, tmp_path, "--adapter", str(folder), "--out", str(tmp_path / "e"))) == 2
    assert "is a PEFT folder already" in capsys.readouterr().err


def test_merge_of_a_cersa_folder_writes_its_own_model_which_serves(tmp_path, capsys):
    """`pica-serve merge` writes U_k C V_k in place of each target weight; the folder serves as a plain model over
    HTTP, answering greedy requests like the torch reference; the server refuses the CERSA folder itself (400, with
    the merge command), and so does `pica-serve export`."""
    from safetensors.torch import load_file

    from adapters.cersa_writer import write_cersa_dir
    from adapters.targets import find_target_linears
    from server.config import DEFAULT_TARGET_MODULES
    from server.http.app import build_app
    from tests.helpers import app_config
    from tests.server.live import LiveServer
    from tests.server.test_http_errors import error_of
    from tests.server.test_http_generate import PROMPT, native, upload

    model_dir = build_tiny_model(tmp_path / "m", "qwen2", seed=2)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    folder = write_cersa_dir(tmp_path / "cersa", base, DEFAULT_TARGET_MODULES, 0.9, core_noise=0.3, seed=4)
    root = tmp_path / "srv"
    out = root / "model"
    assert main(cli_args("merge", model_dir, tmp_path, "--adapter", str(folder), "--out", str(out))) == 0
    assert "wrote the cersa model" in capsys.readouterr().out

    tensors = load_file(folder / "adapter_model.safetensors")
    with torch.no_grad():
        for layer, linear in find_target_linears(base, DEFAULT_TARGET_MODULES).items():
            linear.weight.copy_((tensors[f"U.{layer}"].double() @ tensors[f"core.{layer}"].double()
                                 @ tensors[f"V.{layer}"].double()).float())
        ids = torch.randint(0, 250, (1, 9))
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits,
                                   base(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    assert main(cli_args("export", model_dir, tmp_path, "--adapter", str(folder), "--out", str(tmp_path / "e"))) == 2
    assert "it is a separate model" in capsys.readouterr().err

    with LiveServer(build_app(app_config(root))) as live:
        err = error_of(upload(live.base_url, "cersa", folder), 400)
        assert "it is a separate model" in err["message"] and "`pica-serve merge --model BASE" in err["message"]
        big = bytes(live.state.store.expect.max_weights_bytes + 1)  # a real CERSA file is model-sized
        response = httpx.post(f"{live.base_url}/v1/adapters", data={"adapter_id": "cersa-big"}, timeout=30, files=[
            ("files", ("adapter_config.json", (folder / "adapter_config.json").read_bytes())),
            ("files", ("adapter_model.safetensors", big))])
        assert "`pica-serve serve --model OUT`" in error_of(response, 400)["message"]
        tokens = [t for event in native(live, None, stream=True, max_tokens=8) for t in event["token_ids"]]
        expected = live.state.tokenize(PROMPT)
        with torch.no_grad():
            for _ in range(8):
                expected.append(int(base(input_ids=torch.tensor([expected])).logits[0, -1].argmax()))
        assert tokens == expected[-8:]
