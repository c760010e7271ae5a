"""The JSON schema of `MarbleConfig`, exported to docs/config-schema.json (a test keeps it in sync)."""

from __future__ import annotations

import json

from marble.config import MarbleConfig

SCHEMA_PATH = "docs/config-schema.json"


def schema_json() -> str:
    return json.dumps(MarbleConfig.model_json_schema(), indent=2, sort_keys=True) + "\n"
