"""The `marble` command line: config tools, the five stages, rewards, the pipeline and benchmarks.

User errors (bad config, bad data, missing files, weights that differ from the model lock) print one
clear message and exit 2; a storage failure (disk full, quota, read-only volume) exits 74 (EX_IOERR);
no traceback. A broken internal invariant (`marble.errors.InternalError`, a bug) prints its traceback
and exits 70.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from marble.configio import ConfigError, config_to_yaml, load_config, read_config_dict, validate_config
from marble.errors import InternalError, MarbleError, StorageError

EXIT_USER_ERROR = 2
EXIT_IO_ERROR = 74  # sysexits.h EX_IOERR: retrying after freeing space can succeed
EXIT_INTERNAL_ERROR = 70
"""sysexits' EX_SOFTWARE: marble itself is at fault."""


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config",
        "-c",
        required=required,
        help="YAML config file, or the name of a shipped config (tiny, sd35m-marble)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)",
    )


def _add_version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--version",
        help="an uploaded pipeline version to use (default: this code and config's version, uploaded "
        "if missing)",
    )


def _add_param_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a typed run parameter of the pipeline, e.g. --param epochs=5 (repeatable; the names "
        "are in docs/kubeflow.md)",
    )


def _cfg(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _config_path(args: argparse.Namespace) -> Path:
    """The config file itself (a shipped config named without a path resolved to its file)."""
    from marble.configio import resolve_config_path

    return resolve_config_path(args.config)


def _lock(args: argparse.Namespace):
    """The model lock beside the config (`configs/x.lock.yaml`), or None."""
    from marble.model_cache import load_lock_for

    return load_lock_for(_config_path(args))


def _model_args(args: argparse.Namespace, default_cache: Callable[[], Path]) -> dict:
    """reward_cache / lock / reward_cache_sha256 for a stage that loads models (the default cache is
    looked up only when --reward-cache is not given)."""
    cache = _existing(args.reward_cache, default_cache)
    return {"reward_cache": cache, "lock": _lock(args), "reward_cache_sha256": args.reward_cache_sha256}


def _existing(path: str | None, default: Callable[[], Path]) -> Path | None:
    """`path` if given, else the default when it exists (optional inputs such as the reward cache)."""
    if path:
        return Path(path)
    fallback = default()
    return fallback if fallback.exists() else None


# ------------------------------------------------------------------------------------------ config
def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    print(config_to_yaml(cfg), end="")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    for path in args.files:
        cfg = validate_config(read_config_dict(path), str(path))
        print(
            f"{path}: OK (config hash {cfg.config_hash()}, {len(cfg.rewards)} rewards, balancer {cfg.balancer.kind})"
        )
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from marble.schema import schema_json

    text = schema_json()
    if args.out:
        from marble.io import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


# ------------------------------------------------------------------------------------------ stages
def _dirs(args: argparse.Namespace):
    """The config, and a function giving the default output directories of each stage
    (`<output_dir>/<run_name>/<stage>`).

    The defaults are looked up only for a path the command line leaves out: `dvc.yaml` passes every
    path, so its stages read neither `output_dir` nor `run_name` (each stage reads only the params its
    DVC stage lists).
    """
    from marble.paths import stage_dirs

    cfg = _cfg(args)
    return cfg, functools.partial(stage_dirs, cfg)


def cmd_prepare(args: argparse.Namespace) -> int:
    from marble import stages

    cfg, d = _dirs(args)
    manifest = stages.prepare_prompts(cfg, args.out or d().prompts)
    print(f"prompts written; manifest: {manifest}")
    return 0


def cmd_cache_rewards(args: argparse.Namespace) -> int:
    from marble import stages

    cfg, d = _dirs(args)
    from marble.hub.lock import lock_path_for

    config = _config_path(args)
    lock_file = lock_path_for(config)
    write = {"write_lock": lock_file, "config_name": config.name} if args.write_lock else {}
    manifest = stages.cache_reward_models(cfg, args.out or d().reward_cache, lock=_lock(args), **write)
    print(f"reward cache ready; manifest: {manifest}")
    if args.write_lock:
        print(f"model lock: {lock_file}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from marble import model_cache

    cfg, d = _dirs(args)
    cache = Path(args.reward_cache or d().reward_cache)
    if args.check:
        print(model_cache.check_lock(cfg, _config_path(args), cache))
        return 0
    from marble.hub.lock import lock_path_for

    path = lock_path_for(_config_path(args))
    lock, changed = model_cache.lock_models(
        cfg, path, cache, config_name=path.name.replace(".lock.yaml", ".yaml"), update=args.update
    )
    state = "written" if changed else "up to date"
    print(f"model lock {state}: {path} ({len(lock.models)} model repos, sha256 {lock.sha256[:16]})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from marble import stages

    cfg, d = _dirs(args)
    adapter = stages.train(
        cfg, args.prompts or d().prompts, args.out or d().train, **_model_args(args, lambda: d().reward_cache)
    )
    print(f"adapter: {adapter}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from marble import stages

    cfg, d = _dirs(args)
    train_dir = Path(args.train_dir) if args.train_dir else d().train
    adapter = args.adapter or train_dir / "adapter"
    metrics = stages.evaluate(
        cfg,
        args.prompts or d().prompts,
        adapter,
        args.out or d().eval,
        **_model_args(args, lambda: d().reward_cache),
        train_dir=train_dir if train_dir.exists() else None,
    )
    print(f"metrics: {metrics}\nreport:  {Path(metrics).parent / 'report.html'}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from marble import stages

    cfg, d = _dirs(args)
    adapter, eval_dir = args.adapter or d().train / "adapter", args.eval_dir or d().eval
    promotion = stages.Promotion(cfg, adapter, eval_dir, registry_dir=args.registry_dir or d().registry)
    decision = stages.gate(promotion, args.out or d().eval.parent / "gate")
    print(json.dumps(decision, indent=2, default=str))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from marble import stages

    cfg, d = _dirs(args)
    promotion = stages.Promotion(cfg, args.adapter or d().train / "adapter", args.eval_dir or d().eval)
    record = stages.register_adapter(promotion, args.out or d().registry)
    print(json.dumps(record, indent=2, default=str))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from marble.registry.register import fetch_adapter

    cfg, d = _dirs(args)
    path, version = fetch_adapter(cfg, Path(args.registry_dir or d().registry), args.alias, args.out)
    print(f"{cfg.registry.model_name} version {version.version} ({args.alias}): {path}")
    print(f"load it with: pipe.load_lora_weights({str(path)!r})")
    return 0


def cmd_rewards_check(args: argparse.Namespace) -> int:
    from marble.model_cache import run_hub
    from marble.rewards.check import check_rewards

    cfg = _cfg(args)
    hub = run_hub(
        cfg, cache_dir=args.reward_cache, lock=_lock(args), manifest_sha256=args.reward_cache_sha256,
        config_hint=args.config,
    )  # fmt: skip
    report = check_rewards(cfg, hub=hub)
    print(report)
    return 0


# ---------------------------------------------------------------------------------------- pipeline
def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines import cli as pipeline_cli

    return pipeline_cli.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    from marble.shipped import checkout_root

    root = checkout_root()
    if root is None:
        raise MarbleError(
            "`marble bench` runs from a source checkout only: the benchmarks (bench/) are not part of the "
            "installed package. Clone the repository, then run `make bench` or `marble bench NAME` there."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.argv = ["bench", *args.bench_args]
    runpy.run_module(f"bench.{args.name}", run_name="__main__")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-cache", help="directory written by `marble cache-rewards`")
    p.add_argument(
        "--reward-cache-sha256",
        help="sha256 of the cache's manifest.json as cache-rewards wrote it; a different manifest is refused",
    )


def _add_endpoint_args(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument(
        "--host",
        default=os.environ.get("KF_PIPELINES_ENDPOINT") or None,
        help="KFP endpoint, e.g. https://kubeflow.example.com/pipeline (default: $KF_PIPELINES_ENDPOINT)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("KFP_NAMESPACE") or None,
        help="Kubeflow profile namespace of the run; multi-user Kubeflow refuses requests without one "
        "(default: $KFP_NAMESPACE)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marble", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_config_commands(sub)
    _add_stage_commands(sub)
    _add_registry_and_reward_commands(sub)
    _add_pipeline_commands(sub)
    p = sub.add_parser("bench", help="run a benchmark module from bench/")
    p.add_argument("name", help="benchmark module, e.g. balancer_overhead")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def _add_config_commands(sub) -> None:
    cfg_p = sub.add_parser("config", help="show, validate or export the config schema")
    cfg_sub = cfg_p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = cfg_sub.add_parser("show", help="print the resolved config (file + --set overrides)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)
    p = cfg_sub.add_parser("validate", help="check one or more config files")
    p.add_argument("files", nargs="+", help="config files or shipped config names (tiny, sd35m-marble)")
    p.set_defaults(func=cmd_config_validate)
    p = cfg_sub.add_parser("schema", help="print (or write) the JSON schema of the config")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_config_schema)


def cmd_conditioning(args: argparse.Namespace) -> int:
    from marble.eval.conditioning import format_accuracy, world_conditioning
    from marble.model_cache import run_hub
    from marble.models.loading import load_pipeline
    from marble.models.lora import load_adapter_into_pipeline

    cfg = _cfg(args)
    pipe = load_pipeline(cfg.model, hub=run_hub(cfg, config_hint=args.config))
    if args.adapter:
        load_adapter_into_pipeline(pipe, args.adapter)
    world = world_conditioning(pipe, cfg, images_per_prompt=args.images_per_prompt, seed=args.seed)
    if args.json:
        print(json.dumps(world.as_dict(), indent=2))
    else:
        ceiling = world.vae_round_trip
        print(format_accuracy(world.sampled))
        print(
            f"VAE round trip of the renderer's own images (the ceiling): colour {ceiling.color:.1%}, "
            f"position {ceiling.position:.1%}"
        )
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    """Build the config's tiny model once (cached by config hash) and print its directory: a build
    step of its own for a container image layer, a CI cache or a test session's background build."""
    from marble.models.tiny import ensure_tiny_model

    cfg = _cfg(args)
    if not cfg.model.is_tiny:
        raise ConfigError(
            f"{args.config}: model.pretrained={cfg.model.pretrained!r} is not the tiny model; "
            "`marble tiny-model` builds only `model.pretrained: tiny`"
        )
    print(ensure_tiny_model(cfg.model))
    return 0


STAGE_COMMANDS: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
    ("prepare", "stage 1: validate, mix and split prompt sources", cmd_prepare),
    ("cache-rewards", "stage 2: snapshot reward models into a verified cache", cmd_cache_rewards),
    ("train", "stage 3: MARBLE training of a LoRA adapter", cmd_train),
    ("evaluate", "stage 4: multi-reward evaluation, base vs. adapter, report", cmd_evaluate),
    ("gate", "the promotion decision against the registry's champion (registers nothing)", cmd_gate),
    ("register", "stage 5: register the adapter; promote it if the gate passes", cmd_register),
]


def _add_stage_commands(sub) -> None:
    for name, help_text, func in STAGE_COMMANDS:
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.add_argument("--out", help="output directory (default: <output_dir>/<run_name>/<stage>)")
        if name in ("train", "evaluate"):
            p.add_argument("--prompts", help="directory written by `marble prepare`")
            _add_model_args(p)
        if name == "cache-rewards":
            p.add_argument(
                "--write-lock",
                action="store_true",
                help="also write the model lock beside the config from what was cached (keeps existing pins)",
            )
        if name == "evaluate":
            p.add_argument("--adapter", help="adapter directory (default: <train dir>/adapter)")
            p.add_argument("--train-dir", help="training directory (for the training curves in the report)")
        if name in ("gate", "register"):
            p.add_argument("--adapter", help="adapter directory")
            p.add_argument("--eval-dir", help="directory written by `marble evaluate`")
        if name == "gate":
            p.add_argument(
                "--registry-dir", help="embedded registry dir (default: <output_dir>/<run_name>/registry)"
            )
        p.set_defaults(func=func)


def _add_registry_and_reward_commands(sub) -> None:
    p = sub.add_parser("fetch", help="download the registered adapter an alias points to (sha256 verified)")
    _add_config_args(p)
    p.add_argument("--alias", default="champion", help="registry alias (champion or candidate)")
    p.add_argument("--registry-dir", help="embedded registry dir (default: <output_dir>/<run_name>/registry)")
    p.add_argument(
        "--out", help="download directory (default: <registry dir>/fetched/<alias>-<sha256 prefix>)"
    )
    p.set_defaults(func=cmd_fetch)

    rw = sub.add_parser("rewards", help="reward tools")
    rw_sub = rw.add_subparsers(dest="rewards_command", required=True, metavar="ACTION")
    p = rw_sub.add_parser("check", help="score golden images with every reward; fail on broken rewards")
    _add_config_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_rewards_check)

    p = sub.add_parser(
        "conditioning",
        help="how often the model draws the named colour and position on colour x shape prompts held out "
        "from the tiny model's pretraining (chance 12.5%% and 25%%)",
    )
    _add_config_args(p)
    p.add_argument("--adapter", help="a trained adapter directory to measure instead of the base model")
    p.add_argument("--images-per-prompt", type=int, default=2, help="seeds per held-out prompt (80 prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_conditioning)

    p = sub.add_parser(
        "tiny-model",
        help="build the config's tiny model now (once per config hash, under model.cache_dir) and print "
        "its directory",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser(
        "lock",
        help="pin every model the config loads (revision, sha256 of each file) in <config>.lock.yaml",
    )
    _add_config_args(p)
    p.add_argument(
        "--reward-cache", help="cache to snapshot into (default: <output_dir>/<run_name>/reward-cache)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help="re-resolve every model (unpinned repos move)")
    mode.add_argument(
        "--check", action="store_true", help="verify the lock and the cached files; write nothing"
    )
    p.set_defaults(func=cmd_lock)


def _add_pipeline_commands(sub) -> None:
    pl = sub.add_parser("pipeline", help="run, compile, upload or schedule the Kubeflow pipeline")
    pl_sub = pl.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    p = pl_sub.add_parser("run", help="run the pipeline (--local: kfp SubprocessRunner, no cluster)")
    _add_config_args(p, required=False)
    p.add_argument("--local", action="store_true", help="run locally with Kubeflow's SubprocessRunner")
    p.add_argument("--pipeline-root", help="where local artifacts go (default: <output_dir>/kfp)")
    _add_endpoint_args(p)
    p.add_argument("--experiment", help="KFP experiment of a cluster run (default: pipeline.name)")
    _add_version_arg(p)
    _add_param_arg(p)
    p.set_defaults(func=cmd_pipeline)
    p = pl_sub.add_parser("compile", help="compile the pipeline to IR YAML")
    _add_config_args(p, required=False)
    p.add_argument("--out", default="pipelines/marble_pipeline.yaml")
    p.set_defaults(func=cmd_pipeline)
    p = pl_sub.add_parser(
        "upload", help="upload the pipeline, or a new version of it named by git commit and config hash"
    )
    _add_config_args(p, required=False)
    _add_endpoint_args(p)
    p.add_argument("--version-name", help="name of the version (default: <git commit>-<config hash>)")
    p.set_defaults(func=cmd_pipeline)
    p = pl_sub.add_parser("schedule", help="create or replace a recurring run of an uploaded version")
    _add_config_args(p, required=False)
    _add_endpoint_args(p)
    p.add_argument("--experiment", default="marble")
    p.add_argument(
        "--name", help="recurring run name; the same name replaces it (default: <pipeline>-<run_name>)"
    )
    p.add_argument("--cron", help="6-field cron (default: pipeline.schedule_cron)")
    p.add_argument("--dry-run", action="store_true", help="print the request instead of sending it")
    _add_version_arg(p)
    _add_param_arg(p)
    p.set_defaults(func=cmd_pipeline)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IO_ERROR
    except (ConfigError, MarbleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except InternalError as exc:
        traceback.print_exc()
        print(
            f"internal error (a bug in marble, not in your input; please report it): {exc}", file=sys.stderr
        )
        return EXIT_INTERNAL_ERROR
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(("marble.", "pipelines", "bench")):
            print(
                f"error: `marble {args.command}` is not built yet (missing module {exc.name})",
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
