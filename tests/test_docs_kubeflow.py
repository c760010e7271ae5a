"""docs/kubeflow.md's cluster walk-through is copy-pasteable: every `marble` command parses with the
real CLI, every config it writes validates, and the secrets it creates hold the keys the pipeline
injects (KFP 2.4/2.5 would leave a pod waiting for a missing key for ever)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from marble.cli import build_parser
from marble.cluster.secrets import task_secrets
from marble.configio import load_config

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "kubeflow.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", DOC, re.S)


def commands() -> list[list[str]]:
    out = []
    for block in BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line.split(" > ")[0], comments=True))
    return out


def test_every_marble_command_parses_with_the_real_cli():
    parser = build_parser()
    seen = set()
    for argv in commands():
        if argv and argv[0] == "marble":
            args = parser.parse_args(argv[1:])
            seen.add(
                (
                    args.command,
                    getattr(args, "pipeline_command", None) or getattr(args, "config_command", None),
                )
            )
    assert {
        ("pipeline", "run"),
        ("pipeline", "schedule"),
        ("pipeline", "compile"),
        ("config", "show"),
    } <= seen


def test_the_cluster_config_the_docs_write_is_valid_for_a_cluster():
    (show,) = [a for a in commands() if a[:3] == ["marble", "config", "show"]]
    args = build_parser().parse_args(show[1:])
    cfg = load_config(REPO / args.config, args.overrides)
    from marble.cluster.preflight import cluster_problems

    assert cluster_problems(cfg) == []
    assert cfg.pipeline.hub_token_secret == "marble-hf-token"


def test_created_secrets_hold_every_key_the_pipeline_injects():
    created: dict[str, set[str]] = {}
    for argv in commands():
        if argv[:1] == ["kubectl"] and "secret" in argv and "create" in argv:
            name = argv[argv.index("generic") + 1]
            keys = {a.split("=", 1)[1].split("=")[0] for a in argv if a.startswith("--from-literal=")}
            created[name] = created.get(name, set()) | keys
    paper = REPO / "configs" / "sd35m-marble.yaml"
    variants = [
        load_config(paper, ["data.root=/d"]),
        load_config(
            paper,
            [
                "data.dvc.repo=https://git.example.com/p.git", "pipeline.dvc_secret=marble-dvc-remote",
                "registry.tracking_uri=https://mlflow.example.com", "pipeline.registry_token_secret=marble-registry-token",
            ],
        ),
    ]  # fmt: skip
    for cfg in variants:
        for secrets in task_secrets(cfg).values():
            for s in secrets:
                assert s.secret in created, f"docs never create {s.secret}"
                assert set(s.keys) <= created[s.secret], (
                    f"{s.secret}: docs create {created[s.secret]}, tasks read {s.keys}"
                )
