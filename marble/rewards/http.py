"""A reward behind an HTTP endpoint: JSON with a schema, bounded timeouts and retries, never pickle.

Wire format `marble-reward/1` (one POST per chunk of `spec.batch_size` applicable images):
```
request  {"schema": "marble-reward/1", "reward": <name>, "prompts": [str], "metadata": [object],
          "images": [base64 PNG, RGB 8-bit]}
response {"schema": "marble-reward/1", "scores": [number | null]}    (same length; null = no score)
```
Both sides are validated with pydantic; a reply that is not JSON, has the wrong schema or length, or
has a 4xx status is a `RewardError` (no retry). Timeouts, connection errors and 5xx replies are retried
`spec.retries` times with exponential backoff. Only the standard library's urllib is used.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from marble.errors import RewardError
from marble.images import to_uint8_hwc
from marble.rewards.base import BaseReward

log = logging.getLogger(__name__)

SCHEMA = "marble-reward/1"


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_: Literal["marble-reward/1"] = SCHEMA
    reward: str
    prompts: list[str]
    metadata: list[dict]
    images: list[str]

    def to_json(self) -> bytes:
        data = self.model_dump()
        data["schema"] = data.pop("schema_")
        return json.dumps(data).encode()


class ScoreResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_: Literal["marble-reward/1"]
    scores: list[float | None]

    @classmethod
    def from_json(cls, body: bytes) -> ScoreResponse:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("reply is not a JSON object")
        data["schema_"] = data.pop("schema", None)
        return cls.model_validate(data)


def encode_png(images: Tensor) -> list[str]:
    """`[N, 3, H, W]` in [0, 1] -> base64 PNGs (lossless, so the server sees what was generated)."""
    out = []
    for arr in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


class HttpScorer(BaseReward):
    """Client of a `marble-reward/1` server; see the module docstring."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        lo = spec.score_min if spec.score_min is not None else -math.inf
        hi = spec.score_max if spec.score_max is not None else math.inf
        self.score_range = (lo, hi)

    def _post(self, body: bytes) -> bytes:
        s = self.spec
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if s.token_env and os.environ.get(s.token_env):
            headers["Authorization"] = f"Bearer {os.environ[s.token_env]}"
        last: Exception | None = None
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(s.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(s.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=s.timeout_s) as reply:
                    return reply.read()
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise RewardError(
                        f"reward {self.name!r}: {s.url} refused the request: HTTP {exc.code}"
                    ) from exc
                last = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
            log.warning(
                "reward %r: attempt %d/%d to %s failed: %s",
                self.name,
                attempt + 1,
                s.retries + 1,
                s.url,
                last,
            )
        raise RewardError(f"reward {self.name!r}: {s.url} failed after {s.retries + 1} attempts: {last}")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        body = ScoreRequest(reward=self.name, prompts=prompts, metadata=metadata, images=encode_png(images))
        raw = self._post(body.to_json())
        try:
            reply = ScoreResponse.from_json(raw)
        except (ValueError, ValidationError) as exc:
            raise RewardError(
                f"reward {self.name!r}: {self.spec.url} sent an invalid {SCHEMA} reply: {exc}"
            ) from exc
        if len(reply.scores) != len(prompts):
            raise RewardError(
                f"reward {self.name!r}: {self.spec.url} returned {len(reply.scores)} scores for {len(prompts)} images"
            )
        return torch.tensor([math.nan if v is None else v for v in reply.scores], dtype=torch.float64)
