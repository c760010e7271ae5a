"""Readers of the prompt-source formats users have: txt, JSONL, GenEval metadata JSONL, CSV, tiny world.

Each reader returns `SourcePrompts`: validated prompts with their location (file, line) and a
description of the source with its content hash (sha256 of the file's bytes) for the manifest.
Every problem raises a DataError naming the file, the line and the field; files are decoded as
strict UTF-8 line by line so an invalid byte is reported at its line.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from marble.config import (
    CsvSource,
    DataConfig,
    DvcData,
    GenEvalSource,
    JsonlSource,
    TextSource,
    TinyWorldSource,
)
from marble.data import tiny_world
from marble.data.validation import Location, data_error, validate_geneval, validate_prompt
from marble.errors import DataError


class RawPrompt(NamedTuple):
    """A validated prompt before mixing: text, family tag, metadata, and where it came from."""

    prompt: str
    family: str
    metadata: dict[str, Any]
    where: Location


class SourcePrompts(NamedTuple):
    prompts: list[RawPrompt]
    info: dict[str, Any]  # manifest entry: kind, path, family, sha256, bytes, records


# ------------------------------------------------------------------------------------------ helpers
def _read_bytes(path: Path, config_field: str) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: prompt source not found (field {config_field})")
    if not path.is_file():
        raise DataError(f"{path}: prompt source is not a file (field {config_field})")
    return _non_empty(path, path.read_bytes())


def _non_empty(path: Path | str, data: bytes) -> bytes:
    if not data.strip():
        raise DataError(f"{path}:1: field prompt: the file is empty (no prompts)")
    return data


def _read_dvc(path: str, spec: DvcData, config_field: str) -> bytes:
    import dvc.api

    where = f"{spec.repo}@{spec.rev or 'HEAD'}:{path}"
    try:
        data = dvc.api.read(path, repo=spec.repo, rev=spec.rev, remote=spec.remote, mode="rb")
    except Exception as exc:  # dvc raises many types (Git, remote, missing file); the message says which
        raise DataError(
            f"{where}: cannot read the prompt source through DVC (field {config_field}; data.dvc.repo / "
            f"data.dvc.rev / data.dvc.remote; remote credentials come from the environment): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return _non_empty(where, data)


def load_source(path: str, cfg: DataConfig, config_field: str) -> tuple[Path, bytes]:
    """(where, bytes) of a source file: through DVC when `data.dvc` is set, else `data.root / path`
    for a relative path (or the path itself)."""
    if cfg.dvc is not None:
        return Path(f"{cfg.dvc.repo}@{cfg.dvc.rev or 'HEAD'}") / path, _read_dvc(path, cfg.dvc, config_field)
    resolved = Path(cfg.root) / path if cfg.root and not Path(path).is_absolute() else Path(path)
    return resolved, _read_bytes(resolved, config_field)


def _decoded_lines(path: Path, data: bytes) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, strict UTF-8; a final newline does not make an extra line."""
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    for lineno, raw in enumerate(raw_lines, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark written by some editors
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: field prompt: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                "re-save the file as UTF-8"
            ) from None
        yield lineno, text.removesuffix("\r")


def _family(src: Any) -> str:
    return src.family or src.kind


def _info(src: Any, data: bytes, count: int) -> dict[str, Any]:
    return {
        "kind": src.kind,
        "path": src.path,
        "family": _family(src),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "records": count,
    }


def _limited(items: list[RawPrompt], limit: int | None) -> bool:
    return limit is not None and len(items) >= limit


def _json_object(line: str, where: Location) -> dict[str, Any]:
    if not line.strip():
        raise data_error(where, "<line>", "empty line in a JSONL file (one JSON object per line)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise data_error(where, "<json>", f"malformed JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise data_error(where, "<json>", f"expected a JSON object, got {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------------ readers
def read_text(src: TextSource, cfg: DataConfig, config_field: str) -> SourcePrompts:
    """Plain text, one prompt per line; blank lines are refused (they are usually a broken export)."""
    return _read_lines(src, cfg, config_field, lambda line, where: (line, {}))


def read_jsonl(src: JsonlSource, cfg: DataConfig, config_field: str) -> SourcePrompts:
    """JSONL: the prompt under `prompt_field`, every other key kept as metadata.

    Metadata carrying GenEval's `include` is validated with the GenEval schema too, so the GenEval
    reward never meets malformed metadata.
    """
    return _read_lines(
        src, cfg, config_field, functools.partial(_json_prompt, src.prompt_field, _jsonl_metadata)
    )


def read_geneval(src: GenEvalSource, cfg: DataConfig, config_field: str) -> SourcePrompts:
    """GenEval metadata JSONL: {"tag", "include": [...], "exclude"?: [...], "prompt"} per line."""
    return _read_lines(src, cfg, config_field, functools.partial(_json_prompt, "prompt", validate_geneval))


def _jsonl_metadata(obj: dict[str, Any], where: Location) -> dict[str, Any]:
    if "include" not in obj:
        return obj
    return {**obj, **validate_geneval({k: obj[k] for k in ("tag", "include", "exclude") if k in obj}, where)}


def _json_prompt(
    prompt_field: str,
    to_metadata: Callable[[dict[str, Any], Location], dict[str, Any]],
    line: str,
    where: Location,
) -> tuple[Any, dict[str, Any]]:
    """(prompt, metadata) of one JSON-object line: the prompt under `prompt_field`, the rest through
    `to_metadata`."""
    obj = _json_object(line, where)
    if prompt_field not in obj:
        raise data_error(where, prompt_field, "required field is missing")
    prompt = obj.pop(prompt_field)
    return prompt, to_metadata(obj, where)


def _read_lines(
    src: Any, cfg: DataConfig, config_field: str, parse: Callable[[str, Location], tuple[Any, dict[str, Any]]]
) -> SourcePrompts:
    """One prompt per line of a text file: `parse` gives each line's (prompt, metadata)."""
    path, data = load_source(src.path, cfg, config_field)
    out: list[RawPrompt] = []
    for lineno, line in _decoded_lines(path, data):
        if _limited(out, src.limit):
            break
        where = Location(str(path), lineno)
        prompt, metadata = parse(line, where)
        rec = validate_prompt(prompt, metadata, where, cfg.max_prompt_chars)
        out.append(RawPrompt(rec.prompt, _family(src), rec.metadata, where))
    return SourcePrompts(out, _info(src, data, len(out)))


def read_csv(src: CsvSource, cfg: DataConfig, config_field: str) -> SourcePrompts:
    """CSV with a header row; the prompt in `prompt_column`, other non-empty cells kept as metadata."""
    path, data = load_source(src.path, cfg, config_field)
    text = "\n".join(line for _, line in _decoded_lines(path, data)) + "\n"  # locates bad UTF-8 by line
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if src.prompt_column not in header:
        raise data_error(
            Location(str(path), 1), src.prompt_column, f"column not found in the header {header}"
        )
    out: list[RawPrompt] = []
    try:
        for row in reader:
            if _limited(out, src.limit):
                break
            where = Location(str(path), reader.line_num)
            if None in row:
                raise data_error(
                    where, "<row>", f"{len(row[None]) + len(header)} cells, the header has {len(header)}"
                )
            prompt = row.pop(src.prompt_column)
            if prompt is None:
                raise data_error(
                    where, src.prompt_column, f"missing cell (row has fewer than {len(header)} cells)"
                )
            metadata = {k: v for k, v in row.items() if v not in (None, "")}
            rec = validate_prompt(prompt, metadata, where, cfg.max_prompt_chars)
            out.append(RawPrompt(rec.prompt, _family(src), rec.metadata, where))
    except csv.Error as exc:
        raise data_error(Location(str(path), reader.line_num), "<row>", f"malformed CSV: {exc}") from None
    return SourcePrompts(out, _info(src, data, len(out)))


def read_tiny_world(src: TinyWorldSource, cfg: DataConfig, config_field: str) -> SourcePrompts:
    """The tiny world's generator (general/color/text families 1:1:1) through the same validation."""
    pairs = tiny_world.generate_prompts(src.num_prompts, src.seed)
    if src.limit is not None:
        pairs = pairs[: src.limit]
    where_file = f"<tiny_world seed={src.seed}>"
    out: list[RawPrompt] = []
    for i, (prompt, family) in enumerate(pairs, start=1):
        where = Location(where_file, i)
        rec = validate_prompt(prompt, {}, where, cfg.max_prompt_chars)
        out.append(RawPrompt(rec.prompt, src.family or family, {}, where))
    blob = "".join(f"{p.family}\t{p.prompt}\n" for p in out).encode("utf-8")
    info = {
        "kind": src.kind,
        "num_prompts": src.num_prompts,
        "seed": src.seed,
        "family": src.family or "/".join(tiny_world.FAMILIES),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "records": len(out),
    }
    return SourcePrompts(out, info)


_READERS: dict[str, Callable[[Any, DataConfig, str], SourcePrompts]] = {
    "txt": read_text,
    "jsonl": read_jsonl,
    "geneval": read_geneval,
    "csv": read_csv,
    "tiny_world": read_tiny_world,
}


def read_source(src: Any, cfg: DataConfig, index: int) -> SourcePrompts:
    """Read and validate `cfg.sources[index]` (= `src`) with the reader of its kind."""
    return _READERS[src.kind](src, cfg, f"data.sources.{index}.path")
