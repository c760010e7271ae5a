"""Each DVC stage reads only the params its `dvc.yaml` stage lists.

DVC re-runs a stage when one of its listed params changes; a stage that reads a param it does not list
keeps its old output when that param changes (a silently stale result). This test runs every stage's
`dvc.yaml` command in-process on a small tiny-world config while recording every config field the
stage reads, and checks each read against the stage's `params:`.

Reads are recorded from attribute access on the validated config, after `marble` has loaded it (the
cross-field checks of validation read everything, for every stage): a leaf value or a list is a read
of its path, and so is dumping a section (`model_dump`); reaching a section on the way to a field is
not. Whole-config identities (the config hash, the `config.json` record) are records of the run, not
inputs, and are not counted.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from marble import cli
from marble.config import MarbleConfig, StrictModel

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "cache-rewards", "train", "evaluate", "register"]
SMALL = {
    "data": {"sources": [{"kind": "tiny_world", "num_prompts": 24, "seed": 0}]},
    "sampling": {"group_size": 2, "prompts_per_epoch": 2, "batch_size": 4, "num_steps": 2},
    "train": {"epochs": 1, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "checkpoint_every": 1,
              "tensorboard": False, "progress_bar": False, "diagnostics_every": 1},
    "eval": {"num_steps": 2, "num_prompts": 1, "images_per_prompt": 1, "bootstrap_samples": 100, "grid_prompts": 1},
}  # fmt: skip


class ReadRecorder:
    """Records `section.field` paths read from a `MarbleConfig` (list items count as their list)."""

    def __init__(self) -> None:
        self.active = False
        self.reads: set[str] = set()
        self._prefix: dict[int, tuple[object, str]] = {}  # id(node) -> (node kept alive, "path.")

    def prefix_of(self, node) -> str | None:
        """ "" for the root, "section." for a node reached from it, None for any other node."""
        return "" if isinstance(node, MarbleConfig) else self._prefix.get(id(node), (None, None))[1]

    def install(self, mp: pytest.MonkeyPatch) -> None:
        get, dump = StrictModel.__getattribute__, StrictModel.model_dump
        recorder = self

        def getattribute(node, name):
            value = get(node, name)
            if not recorder.active or name not in type(node).model_fields:
                return value
            prefix = recorder.prefix_of(node)
            if prefix is None:
                return value
            if not isinstance(value, StrictModel):  # a leaf or a list: the stage uses its value
                recorder.reads.add(prefix + name)
            for child in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(child, StrictModel):
                    recorder._prefix[id(child)] = (child, f"{prefix}{name}.")
            return value

        def model_dump(node, *args, **kwargs):
            active = recorder.active
            prefix = recorder.prefix_of(node) if active else None
            if prefix:  # a section dumped whole (the root's dump is the run's record: not counted)
                recorder.reads.add(prefix.rstrip("."))
            recorder.active = False  # the serializer's own attribute reads are part of the dump
            try:
                return dump(node, *args, **kwargs)
            finally:
                recorder.active = active

        mp.setattr(StrictModel, "__getattribute__", getattribute)
        mp.setattr(StrictModel, "model_dump", model_dump)


def _covered(read: str, params: list[str]) -> bool:
    return any(read == p or read.startswith(p + ".") for p in params)


@pytest.fixture(scope="module")
def stage_reads(tiny_config, tmp_path_factory) -> dict[str, set[str]]:
    """Every dvc.yaml stage command, run in order in a scratch directory: stage -> fields read."""
    work = tmp_path_factory.mktemp("dvc-stages")
    params = _merge(tiny_config.model_dump(mode="json"), SMALL)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    mp = pytest.MonkeyPatch()
    recorder = ReadRecorder()
    recorder.install(mp)
    load = cli._cfg

    def load_then_record(args):
        cfg = load(args)
        recorder.active = True
        return cfg

    mp.setattr(cli, "_cfg", load_then_record)
    mp.chdir(work)
    mp.setenv("MARBLE_RUN_ID", "stage-params")
    out = {}
    try:
        for stage in STAGES:
            recorder.active, recorder.reads = False, set()
            argv = shlex.split(dvc["stages"][stage]["cmd"])[1:]
            assert cli.main(argv) == 0, f"{stage}: {' '.join(argv)} failed"
            out[stage] = set(recorder.reads)
    finally:
        mp.undo()
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_only_the_params_dvc_lists(stage_reads, stage):
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]
    reads = stage_reads[stage]
    assert reads, f"{stage}: no config read recorded (is the recorder wired?)"
    unlisted = sorted(r for r in reads if not _covered(r, listed))
    assert not unlisted, (
        f"dvc.yaml stage {stage!r} lists params {listed} but the stage reads {unlisted}: changing those "
        "would not re-run it. List them in dvc.yaml, or stop reading them."
    )


def test_the_recorder_sees_reads_it_should():
    # a nested leaf, a list item and a dumped section are recorded under their paths; reaching a
    # section on the way (cfg.eval on the way to eval.gate.max_regression) is not a read of all of it
    recorder = ReadRecorder()
    mp = pytest.MonkeyPatch()
    recorder.install(mp)
    try:
        cfg = MarbleConfig.model_validate(
            {"rewards": [{"kind": "brightness", "name": "b"}], "sampling": {"resolution": 64}}
        )
        recorder.active = True
        _ = cfg.train.lr, cfg.rewards[0].name, cfg.eval.gate.max_regression, cfg.model.tiny.model_dump()
        cfg.model_dump()  # the whole config: a record of the run
    finally:
        mp.undo()
    assert recorder.reads == {"train.lr", "rewards", "rewards.name", "eval.gate.max_regression", "model.tiny"}
