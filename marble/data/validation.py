"""Per-record validation of prompt sources (pydantic), with errors that name file, line and field.

Two schemas: `PromptInput` (any source: the prompt text and free-form metadata) and
`GenEvalMetadata` (the GenEval metadata JSONL of DiffusionNFT's `dataset/geneval`, following the
GenEval benchmark's `evaluation_metadata.jsonl`: tag, include/exclude objects with class, count,
colour and relative position). A record that fails is reported as `file:line: field F: message`.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from marble.data.records import normalize_prompt
from marble.errors import DataError


class Location(NamedTuple):
    """Where a record came from, for error messages."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def data_error(where: Location, field: str, message: str) -> DataError:
    """The one message format of bad data: `file:line: field F: message`."""
    return DataError(f"{where}: field {field}: {message}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_error(err: ValidationError, where: Location) -> DataError:
    """The first pydantic error as a DataError naming file, line and field path."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<record>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "required field is missing"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling)"
    elif "input" in first and first["type"] != "value_error":
        msg = f"{msg} (got {_shown(first['input'])})"
    return data_error(where, field, msg)


# ------------------------------------------------------------------------------------------ prompts
class PromptInput(BaseModel):
    """One prompt as read from a source, before mixing. Validation context: `max_chars`."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str, info: ValidationInfo) -> str:
        text = normalize_prompt(value)
        if not text:
            raise ValueError("empty prompt")
        bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs")]
        if bad:
            raise ValueError(f"contains control character {bad[0]!r}")
        max_chars = (info.context or {}).get("max_chars")
        if max_chars is not None and len(text) > max_chars:
            raise ValueError(f"{len(text)} characters, more than data.max_prompt_chars={max_chars}")
        return text


def validate_prompt(prompt: Any, metadata: dict[str, Any], where: Location, max_chars: int) -> PromptInput:
    """Validate one prompt (and its metadata dict); DataError names file, line and field."""
    try:
        return PromptInput.model_validate(
            {"prompt": prompt, "metadata": metadata}, context={"max_chars": max_chars}
        )
    except ValidationError as err:
        raise validation_error(err, where) from None


# ------------------------------------------------------------------------------------------ GenEval
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class GenEvalExclude(_Strict):
    """An object class that must NOT appear `count` or more times."""

    class_: StrictStr = Field(alias="class", min_length=1)
    count: StrictInt = Field(ge=1)


class GenEvalObject(_Strict):
    """An object the image must contain: class, count, optional colour and position relative to another."""

    class_: StrictStr = Field(alias="class", min_length=1)
    count: StrictInt = Field(ge=1)
    color: StrictStr | None = Field(None, min_length=1)
    position: tuple[Literal["left of", "right of", "above", "below"], StrictInt] | None = None


class GenEvalMetadata(_Strict):
    """GenEval metadata of one prompt (the record minus its `prompt`)."""

    tag: Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    include: list[GenEvalObject] = Field(min_length=1)
    exclude: list[GenEvalExclude] | None = None

    @field_validator("include")
    @classmethod
    def _positions_refer_to_other_objects(cls, include: list[GenEvalObject]) -> list[GenEvalObject]:
        n = len(include)
        for i, obj in enumerate(include):
            if obj.position is not None:
                ref = obj.position[1]
                if not 0 <= ref < n or ref == i:
                    raise ValueError(
                        f"entry {i}: position index {ref} must name another include entry (0..{n - 1})"
                    )
        return include

    def to_metadata(self) -> dict[str, Any]:
        """Plain dict as stored in PromptRecord.metadata (GenEval's own key names, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def validate_geneval(metadata: dict[str, Any], where: Location) -> dict[str, Any]:
    """Validate GenEval metadata; returns it normalised. DataError names file, line and field."""
    try:
        return GenEvalMetadata.model_validate(metadata).to_metadata()
    except ValidationError as err:
        raise validation_error(err, where) from None
