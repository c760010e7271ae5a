"""The prepare stage end to end: outputs, manifest, records round trip, atomicity, applicability check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from marble import stages
from marble.cli import main
from marble.configio import load_config
from marble.data.prepare import load_prepared, prepare_prompts
from marble.data.records import PromptRecord, read_prompt_records
from marble.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
TINY = ROOT / "configs" / "tiny.yaml"


def _tiny(*overrides: str):
    return load_config(TINY, list(overrides))


def _mixed_cfg(*overrides: str):
    """Four real-format fixture sources mixed, with general, OCR-like and GenEval rewards."""
    sources = (
        f"[{{kind: txt, path: '{FIX / 'prompts.txt'}', family: general}},"
        f" {{kind: jsonl, path: '{FIX / 'prompts.jsonl'}', family: general}},"
        f" {{kind: geneval, path: '{FIX / 'geneval.jsonl'}'}},"
        f" {{kind: csv, path: '{FIX / 'prompts.csv'}', family: general}}]"
    )
    rewards = (
        "[{name: pick, kind: pickscore}, {name: ocr, kind: ocr, held_out: true},"
        " {name: geneval, kind: geneval}, {name: colors, kind: color_match, held_out: true}]"
    )
    return _tiny(f"data.sources={sources}", f"rewards={rewards}", "data.test_fraction=0.25", *overrides)


def test_tiny_prepare_writes_split_files_and_manifest(tmp_path):
    cfg = _tiny()
    manifest_path = stages.prepare_prompts(cfg, tmp_path / "prompts")
    assert manifest_path == tmp_path / "prompts" / "manifest.json"
    assert sorted(p.name for p in (tmp_path / "prompts").iterdir()) == [
        "manifest.json",
        "test.jsonl",
        "train.jsonl",
    ]
    m = json.loads(manifest_path.read_text())
    train = read_prompt_records(tmp_path / "prompts" / "train.jsonl")
    test = read_prompt_records(tmp_path / "prompts" / "test.jsonl")
    n = cfg.data.sources[0].num_prompts  # 96, families 1:1:1
    assert len(train) + len(test) == n and len(test) == round(n * cfg.data.test_fraction)
    assert m["counts"]["per_family"] == {
        f: {"train": 24, "test": 8, "total": 32} for f in ("color", "general", "text")
    }
    per_reward = m["counts"]["per_reward"]
    assert per_reward["brightness"]["total"] == n  # general rewards apply to all
    assert per_reward["color_match"] == {
        "kind": "color_match",
        "held_out": False,
        "train": 24,
        "test": 8,
        "total": 32,
    }
    assert per_reward["edge_detail"]["total"] == 32
    assert m["config_hash"] == cfg.config_hash()
    for name in ("train.jsonl", "test.jsonl"):
        blob = (tmp_path / "prompts" / name).read_bytes()
        assert m["files"][name]["sha256"] == hashlib.sha256(blob).hexdigest()


def test_tiny_split_names_every_colour_and_position_equally_often_on_each_side(tmp_path):
    """A global image change cannot pass for conditioning: each split names every palette colour (and
    every position) equally often, so the zero-sum colour and position rewards average to 0 on each
    split for any image that ignores its prompt (tests/test_rewards_offline.py)."""
    from collections import Counter

    from marble.data.tiny_world import PALETTE, POSITIONS, named_colors, named_position

    for seed in (0, 1):
        stages.prepare_prompts(_tiny(f"data.split_seed={seed}"), tmp_path / f"p{seed}")
        for name, per_colour, per_position in (("train.jsonl", 3, 3), ("test.jsonl", 1, 1)):
            recs = read_prompt_records(tmp_path / f"p{seed}" / name)
            colours = Counter(c for r in recs for c in named_colors(r.prompt))
            positions = Counter(named_position(r.prompt) for r in recs if named_position(r.prompt))
            assert colours == dict.fromkeys(PALETTE, per_colour), (seed, name, colours)
            assert positions == dict.fromkeys(POSITIONS, per_position), (seed, name, positions)


def test_prepare_is_deterministic_byte_for_byte(tmp_path):
    prepare_prompts(_tiny(), tmp_path / "a")
    prepare_prompts(_tiny(), tmp_path / "b")
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_mixed_sources_keep_family_tags_metadata_and_source_hashes(tmp_path):
    cfg = _mixed_cfg()
    m = json.loads(prepare_prompts(cfg, tmp_path / "p").read_text())
    records = read_prompt_records(tmp_path / "p" / "train.jsonl") + read_prompt_records(
        tmp_path / "p" / "test.jsonl"
    )
    assert {r.family: 0 for r in records}.keys() == {"general", "geneval"}
    assert m["counts"]["per_family"]["general"]["total"] == 6 + 4 + 3
    assert m["counts"]["per_family"]["geneval"]["total"] == 4
    by_prompt = {r.prompt: r for r in records}
    assert by_prompt["a photo of two wine glasses"].metadata["exclude"] == [
        {"class": "wine glass", "count": 3}
    ]
    # GenEval applies to the 4 GenEval records and the JSONL record carrying GenEval metadata
    assert m["counts"]["per_reward"]["geneval"]["total"] == 5
    # quoted text: "Fresh Bread", "Open 24 Hours", "Today's Special", "Hello World"
    assert m["counts"]["per_reward"]["ocr"]["total"] == 4
    # palette colours: red bicycle, blue teapot, green tractor, purple umbrella
    assert m["counts"]["per_reward"]["colors"]["total"] == 4
    hashes = [s["sha256"] for s in m["sources"]]
    assert hashes[0] == hashlib.sha256((FIX / "prompts.txt").read_bytes()).hexdigest()
    assert [s["records"] for s in m["sources"]] == [6, 4, 4, 3]


def test_error_leaves_previous_output_untouched_and_no_temp_dirs(tmp_path):
    out = tmp_path / "prompts"
    prepare_prompts(_tiny(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _tiny(f"data.sources=[{{kind: txt, path: '{FIX / 'duplicates.txt'}'}}]")
    with pytest.raises(DataError, match="duplicates.txt:3: field prompt"):
        prepare_prompts(bad, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]


def test_rerun_replaces_output_atomically(tmp_path):
    out = tmp_path / "prompts"
    prepare_prompts(_tiny(), out)
    (out / "stale.txt").write_text("left over")
    prepare_prompts(_tiny("data.split_seed=1"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["split"]["seed"] == 1


def test_trained_reward_that_applies_to_no_training_prompt_is_refused(tmp_path):
    cfg = _tiny(
        f"data.sources=[{{kind: txt, path: '{FIX / 'duplicates.txt'}'}}]",
        "data.on_duplicate=drop",
        "rewards=[{name: b, kind: brightness}, {name: ocr, kind: ocr}]",
    )
    with pytest.raises(
        DataError, match=r"trained reward 'ocr' \(ocr\) applies to none of the 1 training prompts"
    ):
        prepare_prompts(cfg, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_cli_prepare_works_and_prints_the_manifest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "prompts"
    assert main(["prepare", "--config", "configs/tiny.yaml", "--out", str(out)]) == 0
    assert str(out / "manifest.json") in capsys.readouterr().out


def test_read_prompt_records_refuses_hand_edited_files(tmp_path):
    f = tmp_path / "train.jsonl"
    good = PromptRecord.create("a cat", "general").to_json_line()
    f.write_text(good + "\n" + good.replace('"a cat"', '"a dog"') + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.jsonl:2: field id: .* does not match"):
        read_prompt_records(f)
    f.write_text(good + '\n{"id": "x", "prompt": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.jsonl:2: field family"):
        read_prompt_records(f)
    with pytest.raises(DataError, match="not found"):
        read_prompt_records(tmp_path / "missing.jsonl")
    f.write_text("", encoding="utf-8")
    assert read_prompt_records(f) == []  # an empty test split is legitimate (test_fraction 0)


def test_load_prepared_verifies_files_against_the_manifest(tmp_path):
    out = tmp_path / "p"
    prepare_prompts(_tiny(), out)
    train, test, manifest = load_prepared(out)
    assert len(train) == manifest["counts"]["train"] and len(test) == manifest["counts"]["test"]
    with (out / "test.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(PromptRecord.create("a smuggled prompt", "general").to_json_line() + "\n")
    with pytest.raises(DataError, match=r"test.jsonl: content differs from .*manifest.json"):
        load_prepared(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: not found"):
        load_prepared(out)
