"""`marble pipeline run | compile | upload | schedule` (the argument parser lives in marble/cli.py)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from marble.config import MarbleConfig
from marble.configio import ConfigError, load_config
from marble.runparams import parse_run_parameters


def _config(args: argparse.Namespace) -> MarbleConfig:
    from pipelines.marble_pipeline import default_config_path

    return load_config(args.config or default_config_path(), getattr(args, "overrides", None) or [])


def _lock(args: argparse.Namespace):
    """The model lock beside the config (`<config>.lock.yaml`), or None."""
    from marble.configio import resolve_config_path
    from marble.model_cache import load_lock_for
    from pipelines.marble_pipeline import default_config_path

    return load_lock_for(resolve_config_path(args.config or default_config_path()))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    params = parse_run_parameters(args.params)
    if args.local:
        from pipelines.local import run_local

        print(run_local(cfg, args.pipeline_root, params, lock=_lock(args)).summary())
        return 0
    if args.host:
        from pipelines.schedule import submit_run

        experiment = args.experiment or cfg.pipeline.name
        run_id, version = submit_run(
            cfg,
            host=args.host,
            experiment=experiment,
            params=params,
            version=args.version,
            namespace=args.namespace,
            lock=_lock(args),
        )
        where = f" in namespace {args.namespace}" if args.namespace else ""
        print(
            f"started run {run_id} of pipeline {cfg.pipeline.name!r} version {version.name!r} "
            f"on {args.host}{where}"
        )
        return 0
    raise ConfigError("marble pipeline run: choose --local (this machine) or --host URL (a KFP endpoint)")


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.marble_pipeline import compile_pipeline

    out = compile_pipeline(_config(args), args.out, lock=_lock(args))
    print(f"wrote {out}")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from pipelines.kfp_server import connect, upload_version
    from pipelines.marble_pipeline import compile_pipeline
    from pipelines.schedule import require_pushed_images

    cfg = _config(args)
    require_pushed_images()
    client = connect(args.host, args.namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "marble_pipeline.yaml", lock=_lock(args))
        version = upload_version(client, cfg, package, args.version_name)
    what = "uploaded" if version.created else "already uploaded:"
    print(
        f"{what} pipeline {cfg.pipeline.name!r} version {version.name!r} "
        f"(pipeline id {version.pipeline_id}, version id {version.version_id}) on {args.host}"
    )
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.marble_pipeline import compile_pipeline
    from pipelines.schedule import build_request, require_pushed_images, send_recurring_run

    cfg = _config(args)
    if not args.dry_run:
        require_pushed_images()
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "marble_pipeline.yaml", lock=_lock(args))
        request = build_request(
            cfg,
            host=args.host,
            experiment=args.experiment,
            cron=args.cron,
            package=package,
            params=parse_run_parameters(args.params),
            version=args.version,
            name=args.name,
            namespace=args.namespace,
        )
        if args.dry_run:
            print(request.to_json())
            return 0
        run_id, replaced = send_recurring_run(request, cfg, package)
    print(
        f"created recurring run {run_id} ({request.job_name}, version {request.pipeline_version!r}, "
        f"cron '{request.cron}') on {args.host}"
    )
    if replaced:
        print(f"replaced the recurring run(s) of the same name: {', '.join(replaced)}")
    return 0


COMMANDS = {"run": cmd_run, "compile": cmd_compile, "upload": cmd_upload, "schedule": cmd_schedule}


def main(args: argparse.Namespace) -> int:
    return COMMANDS[args.pipeline_command](args)
