"""Prompt-source readers and the bad-input acceptance cases (error names file, line, field; CLI exits 2;
nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from marble.cli import EXIT_USER_ERROR, main
from marble.config import DataConfig
from marble.configio import read_config_dict, validate_config
from marble.data.sources import read_source
from marble.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"


def _read(source: dict, **data_kw):
    cfg = DataConfig.model_validate({"sources": [source], **data_kw})
    return read_source(cfg.sources[0], cfg, 0)


def _config_file(tmp_path: Path, sources: list[dict], **data_kw) -> Path:
    """configs/tiny.yaml with other sources (and only general rewards, so any prompt set is usable)."""
    data = read_config_dict(ROOT / "configs" / "tiny.yaml")
    data["data"] = {"sources": sources, **data_kw}
    data["rewards"] = [{"name": "brightness", "kind": "brightness"}]
    validate_config(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- good inputs
def test_text_source_reads_one_prompt_per_line_with_locations():
    got = _read({"kind": "txt", "path": str(FIX / "prompts.txt"), "family": "mine"})
    assert [p.where.line for p in got.prompts] == [1, 2, 3, 4, 5, 6]
    assert got.prompts[2].prompt == 'a bakery window with a sign that says "Fresh Bread"'
    assert {p.family for p in got.prompts} == {"mine"}
    assert got.info["records"] == 6 and len(got.info["sha256"]) == 64


def test_family_defaults_to_source_kind_and_limit_stops_early():
    got = _read({"kind": "txt", "path": str(FIX / "prompts.txt"), "limit": 2})
    assert [p.family for p in got.prompts] == ["txt", "txt"]


def test_jsonl_keeps_other_keys_as_metadata_and_validates_geneval_keys():
    got = _read({"kind": "jsonl", "path": str(FIX / "prompts.jsonl")})
    assert got.prompts[0].metadata == {"source": "handwritten"}
    assert got.prompts[2].prompt == 'a chalkboard with "Today\'s Special" written on it'
    assert got.prompts[3].metadata == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}


def test_jsonl_custom_prompt_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"caption": "a cat", "prompt": "not this"}\n', encoding="utf-8")
    got = _read({"kind": "jsonl", "path": str(f), "prompt_field": "caption"})
    assert got.prompts[0].prompt == "a cat" and got.prompts[0].metadata == {"prompt": "not this"}


def test_geneval_source_stores_metadata_without_prompt():
    got = _read({"kind": "geneval", "path": str(FIX / "geneval.jsonl")})
    assert len(got.prompts) == 4
    first = got.prompts[0].metadata
    assert first == {
        "tag": "counting",
        "include": [{"class": "wine glass", "count": 2}],
        "exclude": [{"class": "wine glass", "count": 3}],
    }
    assert got.prompts[2].metadata["include"][1]["position"] == ["left of", 0]


def test_csv_source_reads_quoted_cells_and_metadata_columns():
    got = _read({"kind": "csv", "path": str(FIX / "prompts.csv")})
    assert [p.prompt for p in got.prompts] == [
        "a castle on a hill, at sunrise",
        "a purple umbrella in the rain",
        'a poster that says "Hello World" on a wall',
    ]
    assert got.prompts[0].metadata == {"id": "p1", "category": "landscape"}
    assert got.prompts[1].metadata == {"id": "p2"}  # empty cells are not metadata
    assert [p.where.line for p in got.prompts] == [2, 3, 4]


def test_bom_and_crlf_are_accepted(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n")
    assert [p.prompt for p in _read({"kind": "txt", "path": str(f)}).prompts] == ["a cat", "a dog"]


def test_tiny_world_source_uses_generator_families():
    got = _read({"kind": "tiny_world", "num_prompts": 9, "seed": 3})
    assert [p.family for p in got.prompts] == ["general", "color", "text"] * 3


# -------------------------------------------------------------------------------------- bad inputs
# (fixture, source kind, expected line, expected field)
BAD_INPUTS = [
    ("empty.txt", "txt", 1, "prompt"),
    ("invalid_utf8.txt", "txt", 2, "prompt"),
    ("malformed.jsonl", "jsonl", 2, "<json>"),
    ("geneval_missing_include.jsonl", "geneval", 2, "include"),
    ("duplicates.txt", "txt", 3, "prompt"),
    ("blank_line.txt", "txt", 2, "prompt"),
]


@pytest.mark.parametrize(("name", "kind", "line", "field"), BAD_INPUTS)
def test_bad_input_cli_exits_nonzero_names_file_line_field_and_writes_nothing(
    tmp_path, capsys, name, kind, line, field
):
    cfg = _config_file(tmp_path, [{"kind": kind, "path": str(FIX / name)}])
    out = tmp_path / "out" / "prompts"
    rc = main(["prepare", "--config", str(cfg), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR
    assert f"{FIX / name}:{line}: field {field}:" in err, err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out").exists()


def test_missing_file_names_path_and_config_field(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    cfg = _config_file(
        tmp_path, [{"kind": "txt", "path": str(FIX / "prompts.txt")}, {"kind": "txt", "path": str(missing)}]
    )
    out = tmp_path / "out"
    assert main(["prepare", "--config", str(cfg), "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"{missing}: prompt source not found (field data.sources.1.path)" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ('{"tag": "counting", "include": [], "prompt": "x"}', "include", "at least 1"),
        ('{"tag": "counting", "include": [{"class": "cup"}], "prompt": "x"}', "include.0.count", "missing"),
        ('{"tag": "counting", "include": [{"class": "cup", "count": "2"}], "prompt": "x"}', "include.0.count", "integer"),
        ('{"tag": "counting", "include": [{"class": "cup", "count": 0}], "prompt": "x"}', "include.0.count", "greater than or equal to 1"),
        ('{"tag": "nonsense", "include": [{"class": "cup", "count": 1}], "prompt": "x"}', "tag", "counting"),
        ('{"tag": "colors", "inclde": [{"class": "cup", "count": 1}], "prompt": "x"}', "include", "missing"),
        ('{"tag": "colors", "include": [{"class": "cup", "count": 1, "colour": "red"}], "prompt": "x"}',
         "include.0.colour", "unknown field"),
        ('{"tag": "position", "include": [{"class": "cup", "count": 1, "position": ["near", 0]}], "prompt": "x"}',
         "include.0.position.0", "left of"),
        ('{"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["above", 5]}], '
         '"prompt": "x"}', "include", "position index 5"),
        ('{"tag": "counting", "include": [{"class": "cup", "count": 1}]}', "prompt", "missing"),
        ('{"tag": "counting", "include": [{"class": "cup", "count": 1}], "prompt": 7}', "prompt", "string"),
        ('{"tag": "counting", "include": [{"class": "cup", "count": 1}], "prompt": "   "}', "prompt", "empty prompt"),
    ],
)  # fmt: skip
def test_geneval_schema_errors_name_the_field(tmp_path, line, field, expected):
    f = tmp_path / "g.jsonl"
    f.write_text(
        '{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "ok"}\n' + line + "\n"
    )
    with pytest.raises(DataError) as exc:
        _read({"kind": "geneval", "path": str(f)})
    msg = str(exc.value)
    assert msg.startswith(f"{f}:2: field {field}:"), msg
    assert expected in msg, msg


@pytest.mark.parametrize(
    ("content", "line", "field", "expected"),
    [
        ('{"prompt": "a"}\n[1, 2]\n', 2, "<json>", "expected a JSON object"),
        ('{"text": "a"}\n', 1, "prompt", "missing"),
        ('{"prompt": "a\\u0000b"}\n', 1, "prompt", "control character"),
        ('{"prompt": "a"}\n\n{"prompt": "b"}\n', 2, "<line>", "empty line"),
    ],
)
def test_jsonl_errors(tmp_path, content, line, field, expected):
    f = tmp_path / "p.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected) as exc:
        _read({"kind": "jsonl", "path": str(f)})
    assert str(exc.value).startswith(f"{f}:{line}: field {field}:")


def test_csv_errors_name_line_and_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("text,x\nhello,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.csv:1: field prompt: column not found"):
        _read({"kind": "csv", "path": str(f)})
    f.write_text('prompt,x\n"a cat",1\n"",2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.csv:3: field prompt: empty prompt"):
        _read({"kind": "csv", "path": str(f)})
    f.write_text("prompt,x\na cat,1,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.csv:2: field <row>: 3 cells, the header has 2"):
        _read({"kind": "csv", "path": str(f)})


def test_prompt_over_max_chars_is_refused(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("a cat\n" + "word " * 30 + "\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"long.txt:2: field prompt: 149 characters, more than data.max_prompt_chars=100"
    ):
        _read({"kind": "txt", "path": str(f)}, max_prompt_chars=100)
