"""The prepared prompt record: what the `prepare` stage writes and every later stage reads.

`train.jsonl` / `test.jsonl` hold one `PromptRecord` per line (JSON object with `id`, `prompt`,
`family`, `metadata`). The id is stable across runs and machines: it depends only on the
whitespace-normalised prompt text, so the same prompt keeps its id whatever source it came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from marble.errors import DataError


def normalize_prompt(prompt: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends (the form that is stored and hashed)."""
    return " ".join(prompt.split())


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: sha1 of its normalised UTF-8 text, first 12 hex digits."""
    return hashlib.sha1(normalize_prompt(prompt).encode("utf-8")).hexdigest()[:12]


class PromptRecord(BaseModel):
    """One prepared prompt (frozen: records are shared between stages and must not be mutated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="sha1 of the normalised prompt, first 12 hex digits.")
    prompt: str = Field(min_length=1, description="The prompt, whitespace-normalised.")
    family: str = Field(
        min_length=1, description="Source family tag (e.g. general/color/text, pickscore, ocr)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description='Per-prompt metadata, e.g. GenEval {"tag", "include", "exclude"}; {} if none.',
    )

    @classmethod
    def create(cls, prompt: str, family: str, metadata: dict[str, Any] | None = None) -> PromptRecord:
        """Build a record from raw text: normalises the prompt and derives the id."""
        text = normalize_prompt(prompt)
        return cls(id=prompt_id(text), prompt=text, family=family, metadata=metadata or {})

    def to_json_line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, sort_keys=True)


def write_prompt_records(path: Path, records: list[PromptRecord]) -> None:
    """Write records as JSONL (one object per line, UTF-8). Callers make the write atomic."""
    text = "".join(r.to_json_line() + "\n" for r in records)
    Path(path).write_text(text, encoding="utf-8")


def read_prompt_records(path: Path) -> list[PromptRecord]:
    """Read a prepared `train.jsonl` / `test.jsonl`.

    Raises DataError naming the file, line and field when the file is missing or a line is not a
    valid record (e.g. a hand-edited file), so a later stage never trains on half-read prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared prompt file not found (run `marble prepare` first)")
    records: list[PromptRecord] = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}:{lineno}: empty line in a prepared prompt file")
        try:
            records.append(PromptRecord.model_validate_json(line))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "<record>"
            raise DataError(f"{path}:{lineno}: field {field}: {first['msg']}") from None
        rec = records[-1]
        if rec.id != prompt_id(rec.prompt):
            raise DataError(
                f"{path}:{lineno}: field id: {rec.id!r} does not match the prompt's id {prompt_id(rec.prompt)!r}"
            )
    return records  # may be empty: a split with test_fraction 0 has no test prompts
