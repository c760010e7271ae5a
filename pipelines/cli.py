"""`marble pipeline run | compile | schedule` (the argument parser lives in marble/cli.py)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from marble.config import MarbleConfig
from marble.configio import ConfigError, load_config


def _config(args: argparse.Namespace) -> MarbleConfig:
    from pipelines.marble_pipeline import default_config_path

    return load_config(args.config or default_config_path(), getattr(args, "overrides", None) or [])


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.local:
        from pipelines.local import run_local

        print(run_local(cfg, args.pipeline_root).summary())
        return 0
    if args.host:
        from pipelines.schedule import submit_run

        run_id = submit_run(cfg, host=args.host, experiment=cfg.pipeline.name)
        print(f"started run {run_id} on {args.host}")
        return 0
    raise ConfigError("marble pipeline run: choose --local (this machine) or --host URL (a KFP endpoint)")


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.marble_pipeline import compile_pipeline

    out = compile_pipeline(_config(args), args.out)
    print(f"wrote {out}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.marble_pipeline import compile_pipeline
    from pipelines.schedule import build_request, require_pushed_images, send_recurring_run

    cfg = _config(args)
    if not args.dry_run:
        require_pushed_images()
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "marble_pipeline.yaml")
        request = build_request(
            cfg, host=args.host, experiment=args.experiment, cron=args.cron, package=package
        )
        if args.dry_run:
            print(request.to_json())
            return 0
        run_id = send_recurring_run(request)
    print(f"created recurring run {run_id} ({request.job_name}, cron '{request.cron}') on {args.host}")
    return 0


COMMANDS = {"run": cmd_run, "compile": cmd_compile, "schedule": cmd_schedule}


def main(args: argparse.Namespace) -> int:
    return COMMANDS[args.pipeline_command](args)
