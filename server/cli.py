"""`pica-serve` command line: serve, ray, precompute, train, import, export, merge."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from server.config import (
    DEFAULT_TARGET_MODULES,
    DTYPES,
    SVD_METHODS,
    AppConfig,
    EngineConfig,
    ModelConfig,
    ServerConfig,
    default_cache_dir,
    env_default,
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model and basis")
    g.add_argument("--model", default=None, help="local folder, .gguf file (or a folder of one) or hub id (default: the built-in demo model)")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype; auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES), help="comma-separated suffixes")
    g.add_argument("--rank-max", type=int, default=256, help="basis columns cached per layer")
    g.add_argument("--svd-method", default="gram", choices=SVD_METHODS,
                   help="gram: eigendecomposition of the smaller Gram matrix (faster); svd: full SVD")
    g.add_argument("--cache-dir", type=Path, default=None, help="demo model + basis cache (default $PICA_CACHE_DIR)")


def model_config(args) -> ModelConfig:
    return ModelConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        rank_max=args.rank_max,
        svd_method=args.svd_method,
        cache_dir=args.cache_dir or default_cache_dir(),
    )


def load_model_and_basis(cfg: ModelConfig):
    from cache.basis_cache import BasisCache
    from server.model_loader import load_model

    loaded = load_model(cfg)
    basis = BasisCache(cfg.basis_dir).load_or_compute(
        loaded.model, cfg.target_modules, cfg.rank_max, method=cfg.svd_method
    )
    return loaded, basis


def cmd_precompute(args) -> int:
    cfg = model_config(args)
    loaded, basis = load_model_and_basis(cfg)
    print(
        f"basis {basis.checksum} ({basis.source} in {basis.seconds:.1f}s, {len(basis.p)} layers, "
        f"groups {sorted(basis.groups)}) for {loaded.name} in {cfg.basis_dir}"
    )
    return 0


def load_with_adapter(args, separate_models: bool = False):
    """(loaded model, basis, adapter of --adapter), or None after printing why the adapter is refused;
    separate_models: accept separate-model folders (CERSA), checked against the base weights (merge only)."""
    from adapters.format import AdapterExpectation, AdapterValidationError, load_adapter_dir
    from cache.svd_factors import svd_factors_of

    loaded, basis = load_model_and_basis(model_config(args))
    base_weights = None
    if separate_models:
        base_weights = {layer: loaded.model.get_submodule(layer).weight for info in basis.groups.values()
                        for layer in info.layers}
    try:
        # no slot stacks here (merge, export): a LoRA or PSOFT of any rank is fine
        expect = AdapterExpectation.from_basis(basis, sys.maxsize, svd_factors_of(loaded.model, basis),
                                               slot_served=False, base_weights=base_weights)
        return loaded, basis, load_adapter_dir(args.adapter, expect)
    except AdapterValidationError as exc:
        print("\n".join(["adapter refused:"] + [f"  - {p}" for p in exc.problems]), file=sys.stderr)
        return None


def cmd_merge(args) -> int:
    from adapters.merge import merge_adapter
    from adapters.registry import get_method

    found = load_with_adapter(args, separate_models=True)
    if found is None:
        return 2
    loaded, basis, adapter = found
    merge_adapter(loaded.model, basis, adapter)
    loaded.model.save_pretrained(args.out)
    loaded.tokenizer.save_pretrained(args.out)
    if get_method(adapter.config.method).separate_model:
        ranks = adapter.config.layer_ranks
        print(f"wrote the {adapter.config.method} model of {args.adapter} ({len(ranks)} layers replaced, k from "
              f"{min(ranks.values())} to {max(ranks.values())}; the rest of {loaded.name} unchanged): {args.out}")
    else:
        print(f"merged {args.adapter} into {loaded.name}: {args.out}")
    return 0


def adapter_arg(value: str) -> tuple[str, Path]:
    from adapters.store import AdapterIdError, check_adapter_id

    adapter_id, sep, path = value.partition("=")
    try:
        if not sep or not path:
            raise AdapterIdError(f"expected ID=PATH, got {value!r}")
        return check_adapter_id(adapter_id), Path(path)
    except AdapterIdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_import(args) -> int:
    import torch
    from safetensors.torch import load_file

    from adapters.format import save_adapter_dir
    from adapters.reference_import import ReferenceImportError, import_reference

    cfg = model_config(args)
    loaded, basis = load_model_and_basis(cfg)
    svd_device = args.svd_device if args.svd_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    train_dtype = {"auto": torch.bfloat16 if svd_device == "cuda" else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}[args.train_dtype]
    try:
        p_ref = load_file(str(args.reference_basis)) if args.reference_basis else None
        result = import_reference(args.adapter, loaded.model, basis, p_ref, svd_device, train_dtype, args.max_residual,
                                  base_model=loaded.name)
    except (ReferenceImportError, OSError) as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 2
    save_adapter_dir(args.out, result.config, result.tensors)
    for group, residual in sorted(result.residuals.items()):
        print(f"  {group}: subspace residual {residual:.2e}")
    print(f"imported {args.adapter} (r={result.config.r}, groups {list(result.config.target_modules)}): {args.out}")
    return 0


def cmd_export(args) -> int:
    from adapters.peft_export import export_peft_lora

    found = load_with_adapter(args)
    if found is None:
        return 2
    loaded, basis, adapter = found
    from adapters.registry import get_method

    if get_method(adapter.config.method).peft_type is not None:
        print(f"adapter refused: {args.adapter} is a PEFT folder already; serve or merge it as it is",
              file=sys.stderr)
        return 2
    params = export_peft_lora(adapter, basis, args.out, base_model=loaded.name)
    print(f"exported {args.adapter} as a PEFT LoRA folder ({params:,} parameters against PiCa's "
          f"{adapter.num_params:,}): {args.out}")
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("engine")
    defaults = EngineConfig()
    for name, help_text in (
        ("max_num_seqs", "sequences in the running batch"),
        ("max_num_batched_tokens", "token budget of one step"),
        ("max_prefill_tokens_with_decodes", "prompt tokens a step may carry beside running decodes (bounds how "
                                            "long new prompts stall every stream; --max-num-batched-tokens's value: "
                                            "no limit)"),
        ("max_model_len", "prompt + output limit (default: the model's, capped at 8192)"),
        ("block_size", "tokens per KV block"),
        ("num_kv_blocks", "KV capacity override"),
        ("max_gpu_adapters", "GPU slots for adapters"),
        ("max_host_adapters", "adapters kept in host RAM"),
        ("max_rank", "largest adapter r served (default: --rank-max)"),
        ("adapter_pool_ranks", "rank columns the GPU slots hold in all, in pages of 16: an adapter of rank r takes "
                               "ceil(r/16) (default: every slot at --max-rank; lower it to give many small "
                               "adapters more slots in the same memory)"),
        ("max_lora_rank", "largest LoRA rank served from PEFT folders (0: no LoRA; costs GPU slot memory)"),
        ("max_psoft_rank", "largest PSOFT rank served from PEFT folders (0: no PSOFT; costs r*r per layer and slot)"),
        ("max_queue", "waiting requests before 429"),
    ):
        e.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), help=help_text)
    e.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                   help="share of GPU memory for weights, activations and KV cache")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (debugging, comparisons)")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare and launch decode step N+1 while step N runs on the GPU (same tokens; default: on "
                        "with CUDA, off on CPU)")
    e.add_argument("--cpu-kv-cache-gib", type=float, default=defaults.cpu_kv_cache_gib, help="KV cache size on CPU")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="bind address; any but loopback needs --admin-key")
    h.add_argument("--port", type=int, default=8000, help="TCP port")
    h.add_argument("--api-key", default=None, help="bearer key for /v1 routes (default $PICA_API_KEY)")
    h.add_argument("--admin-key", default=None, help="bearer key for adapter writes (default $PICA_ADMIN_KEY)")
    h.add_argument("--adapter-dir", type=Path, default=None, help="adapter store (default <cache-dir>/adapters)")
    h.add_argument("--served-model-name", default=None, help="base model name in the API")
    h.add_argument("--max-upload-mb", type=int, default=512, help="largest adapter upload")
    h.add_argument("--max-body-mb", type=int, default=16, help="largest body of any other request")
    h.add_argument("--allow-insecure-no-auth", action="store_true",
                   help="listen on a non-loopback address without an admin key (anyone may upload and delete adapters)")
    h.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in the HTTP server's process (debugging) instead of its own process")
    h.add_argument("--step-trace", type=Path, default=None, metavar="PATH",
                   help="append one JSON line per engine step to PATH (tokens, device and idle time): latency analysis")
    h.add_argument("--adapter", dest="adapters", action="append", type=adapter_arg, default=[], metavar="ID=PATH",
                   help="serve the adapter folder PATH as ID (repeatable); a bad one is logged and skipped")


def app_config(args) -> AppConfig:
    engine_fields = [f for f in EngineConfig.__dataclass_fields__ if f != "cuda_graphs"]
    engine = EngineConfig(**{f: getattr(args, f) for f in engine_fields}, cuda_graphs=not args.enforce_eager)
    server_kw = dict(host=args.host, port=args.port, adapter_dir=args.adapter_dir,
                     served_model_name=args.served_model_name, max_upload_bytes=args.max_upload_mb * 2**20,
                     max_body_bytes=args.max_body_mb * 2**20,
                     allow_insecure_no_auth=args.allow_insecure_no_auth, adapters=tuple(args.adapters),
                     engine_process=not args.engine_in_process, step_trace=args.step_trace)
    if args.api_key:
        server_kw["api_key"] = args.api_key
    if args.admin_key:
        server_kw["admin_key"] = args.admin_key
    return AppConfig(model=model_config(args), engine=engine, server=ServerConfig(**server_kw))


def cmd_serve(args) -> int:
    """Serve until stopped; exit 2 for a configuration refused up front, 1 when start-up fails later."""
    import uvicorn

    from server.http.app import build_app
    from server.model_loader import ModelNotFoundError, check_model_source

    try:
        cfg = app_config(args)
        check_model_source(cfg.model.model)
    except (ValueError, ModelNotFoundError) as exc:
        print(f"serve refused: {exc}", file=sys.stderr)
        return 2
    server = None

    def stop() -> None:  # a server that cannot load its model exits instead of answering 503 forever
        server.should_exit = True

    app = build_app(cfg, on_load_failed=stop, on_engine_died=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                                           log_level=args.log_level.lower()))
    server.run()
    if app.state.load_error is not None:
        print(f"start-up failed: {app.state.load_error}", file=sys.stderr)
        return 1
    if app.state.engine_error is not None:
        print(f"stopped: {app.state.engine_error}", file=sys.stderr)
        return 1
    return 0


def add_ray_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("ray serve")
    r.add_argument("--replicas", type=int, default=1, help="replicas of the server (each loads the model once)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many (with --max-replicas)")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many")
    r.add_argument("--target-ongoing-requests", type=int, default=32, help="autoscaling target per replica")
    r.add_argument("--max-adapters-per-replica", type=int, default=16,
                   help="adapters Ray counts as loaded on one replica (its multiplexing LRU)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    r.add_argument("--replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 where CUDA is)")
    r.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start a local one)")


def ray_app_from_args(args):
    """The Ray Serve application that `pica-serve ray` (and server.ray_serve.app_builder) runs."""
    import torch

    from server.ray_serve import build_ray_app

    autoscaling = None
    if args.min_replicas is not None or args.max_replicas is not None:
        autoscaling = {"min_replicas": args.min_replicas or 1, "max_replicas": args.max_replicas or args.replicas,
                       "target_ongoing_requests": args.target_ongoing_requests}
    gpus = args.replica_gpus if args.replica_gpus is not None else float(torch.cuda.is_available())
    return build_ray_app(app_config(args), args.replicas, args.max_adapters_per_replica, args.replica_cpus, gpus,
                         autoscaling)


def cmd_ray(args) -> int:
    """Serve through Ray Serve until stopped (replicas share --adapter-dir: on several nodes, a shared volume)."""
    import time

    import ray
    from ray import serve

    try:
        cfg = app_config(args)
    except ValueError as exc:
        print(f"ray refused: {exc}", file=sys.stderr)
        return 2
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
    serve.run(ray_app_from_args(args), name="pica-serve", route_prefix="/")
    print(f"pica-serve on Ray Serve at http://{cfg.server.host}:{cfg.server.port} (Ctrl-C stops it)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_train(args) -> int:
    from adapters.train_data import DataError
    from adapters.trainer import TrainConfig, train

    try:
        cfg = TrainConfig(
            data=args.data, out=args.out, rank=args.rank, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            max_length=args.max_length, warmup_ratio=args.warmup_ratio, schedule=args.schedule,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, basis=args.basis,
            save_every=args.save_every, resume_from=args.resume_from,
        )
        state, *_ = train(cfg, model_config(args))
    except (DataError, ValueError) as exc:
        print(f"training refused: {exc}", file=sys.stderr)
        return 2
    print(f"trained {state.step} steps (final loss {state.losses[-1]:.4f}); adapter in {args.out}")
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--data", type=Path, required=True, help='JSONL of {"prompt", "completion"} or {"messages"}')
    t.add_argument("--out", type=Path, required=True, help="adapter folder to write (checkpoints go to OUT-checkpoints/)")
    t.add_argument("--rank", type=int, default=16, help="adapter rank r (at most --rank-max)")
    t.add_argument("--epochs", type=int, default=None,
                   help="passes over the data (default: 3, or as many as make 200 optimizer steps on small data)")
    t.add_argument("--lr", type=float, default=5e-3, help="AdamW peak learning rate")
    t.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    t.add_argument("--max-length", type=int, default=512, help="tokens per row; longer rows are truncated")
    t.add_argument("--warmup-ratio", type=float, default=0.03, help="share of the steps spent warming up the lr")
    t.add_argument("--schedule", default="linear", choices=("linear", "cosine", "constant"),
                   help="learning-rate decay after the warm-up")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    t.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    t.add_argument("--basis", default="principal", choices=("principal", "random"),
                   help="random: a seeded random orthonormal basis (the paper's ablation); servers refuse it")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and every epoch end)")
    t.add_argument("--resume-from", type=Path, default=None, help="a checkpoint folder to continue from")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None and off switches (their help says what happens then)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def package_version() -> str:
    try:
        return version("pica-serve")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pica-serve", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="log verbosity")
    # --log-level is accepted after the subcommand too; SUPPRESS keeps the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS,
                        help="log verbosity (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                              formatter_class=HelpFormatter)

    p = add_command("serve", "run the HTTP server (the demo model when no --model is given)")
    add_model_args(p)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = add_command("ray", "run the server as Ray Serve replicas, each adapter routed to a replica that holds it "
                           "(pip install 'pica-serve[ray]')")
    add_model_args(p)
    add_serve_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_ray)

    p = add_command("precompute", "compute and cache the frozen basis of a model")
    add_model_args(p)
    p.set_defaults(func=cmd_precompute)

    p = add_command("train", "train a PiCa adapter (the groups of --target-modules) the server serves")
    add_model_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = add_command("import", "convert an adapter of the PiCa authors' reference code (pica_config.json + "
                              "pica_adapter.bin) into an adapter folder this server serves")
    add_model_args(p)
    p.add_argument("--adapter", type=Path, required=True, help="the reference adapter's folder")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--svd-device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="where to recompute the reference's SVD as its trainer did (auto: cuda where present)")
    p.add_argument("--train-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the dtype the reference trainer loaded the weights in (auto: bfloat16 on cuda, else float32)")
    p.add_argument("--reference-basis", type=Path, default=None,
                   help="the trainer's own P tensors (safetensors, one [r, in] per module path): an exact import")
    p.add_argument("--max-residual", type=float, default=1e-3,
                   help="refuse a group whose weight delta changes by more than this (relative) in our basis")
    p.set_defaults(func=cmd_import)

    p = add_command("export", "write an adapter as an exact PEFT LoRA folder (for servers that only know LoRA)")
    add_model_args(p)
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder")
    p.add_argument("--out", type=Path, required=True, help="PEFT folder to write")
    p.add_argument("--format", default="peft-lora", choices=("peft-lora",), help="what to write")
    p.set_defaults(func=cmd_export)

    p = add_command("merge", "write a plain transformers model with an adapter folded in (a CERSA folder: its own "
                             "model, each target weight U_k C V_k)")
    add_model_args(p)
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=cmd_merge)
    return parser


ENV_TRUE, ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(parser: argparse.ArgumentParser, action: argparse.Action, value: str) -> bool | None:
    """A flag's $PICA_<OPTION> value: true or false words, or `auto` for a flag whose default is None (the engine
    decides, as without the variable); anything else stops with a message rather than reading as false."""
    word = value.strip().lower()
    if word in ENV_TRUE or word in ENV_FALSE:
        return word in ENV_TRUE
    if word == "auto" and action.default is None:
        return None
    allowed = ", ".join(ENV_TRUE + ENV_FALSE + (("auto",) if action.default is None else ()))
    parser.error(f"$PICA_{action.dest.upper()}={value!r} is not one of {allowed}")


def apply_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default can come from $PICA_<OPTION> (argparse still converts and checks it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub)
        elif action.option_strings and action.dest not in ("help", "version", "api_key", "admin_key", "adapters"):
            value = env_default(action.dest)
            if value is None:
                continue
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):  # =1, =true, =0 ...
                action.default = env_flag(parser, action, value)
            else:
                action.default = value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    apply_env_defaults(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
