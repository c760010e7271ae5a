"""A reward behind an HTTP endpoint: JSON with a schema, bounded timeouts and retries, never pickle.

Wire format `marble-reward/1` (one POST per chunk of `spec.batch_size` applicable images):
```
request  {"schema": "marble-reward/1", "reward": <name>, "prompts": [str], "metadata": [object],
          "images": [base64 PNG, RGB 8-bit]}
response {"schema": "marble-reward/1", "scores": [number | null]}    (same length; null = no score)
```
Both sides are validated with pydantic; a reply that is not JSON (or nested too deeply to parse), has
the wrong schema or length, is larger than `spec.max_reply_bytes`, or has a 3xx or 4xx status is a
`RewardError` (no retry). Timeouts, connection errors and 5xx replies are retried `spec.retries` times
with exponential backoff. Only the standard library's urllib is used.

The server is not trusted (docs/security.md):
- only http(s) is spoken (the opener has no file, ftp or data handler);
- redirects are never followed, so the bearer token cannot travel to another host (a POST cannot
  follow a 301/302 anyway; point `url` at the final endpoint);
- `spec.timeout_s` is the deadline of the whole request: a watchdog shuts the socket down when it
  passes, so a server that trickles its headers or reply a byte at a time cannot hold the trainer;
- scores outside `score_min..score_max` are refused or clamped (`spec.out_of_range`) by `score_all`,
  which counts them (`train/reward_out_of_range/<name>`);
- the token comes from the environment (`spec.token_env`), never from the URL, and URLs are redacted
  in every message.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import math
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from marble.errors import RewardError
from marble.images import to_uint8_hwc
from marble.rewards.base import BaseReward
from marble.urls import redact_text, redact_url

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
        try:
            data = json.loads(body)
        except RecursionError:
            raise ValueError("reply JSON is nested too deeply") from None
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


class RequestDeadline:
    """Shuts the sockets of one request down when `seconds` have passed.

    A socket timeout bounds each read, not the request: a server sending a byte every few seconds
    never trips it. Shutting the socket down from a timer thread ends any blocked read at once (a
    duplicate of the socket is watched, so this works after TLS has taken the original over).
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> RequestDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock.dup())
            if self.expired:
                self._shutdown(self._sockets[-1])
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed by the peer
            sock.shutdown(socket.SHUT_RDWR)


def _watched(conn_cls: type[http.client.HTTPConnection], deadline: RequestDeadline) -> Callable:
    """A connection factory for urllib whose sockets `deadline` can shut down."""

    def build(*args, **kwargs) -> http.client.HTTPConnection:
        conn = conn_cls(*args, **kwargs)
        # http.client keeps the socket factory as an instance attribute so that it can be replaced.
        conn._create_connection = lambda *a, **k: deadline.watch(socket.create_connection(*a, **k))
        return conn

    return build


class _HttpHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: RequestDeadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: RequestDeadline) -> None:
        super().__init__()
        self.deadline = deadline
        self.context = ssl.create_default_context()

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self.context)


def build_opener(deadline: RequestDeadline) -> urllib.request.OpenerDirector:
    """An opener for http(s) only (proxies from the environment honoured) that follows no redirect: a
    3xx reply raises `HTTPError` like a 4xx."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HttpHandler(deadline),
        _HttpsHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class ReplyTooLarge(Exception):
    """The reply body exceeds `max_reply_bytes`."""


def read_capped(reply, limit: int) -> bytes:
    """The reply body, refused beyond `limit` bytes (by its Content-Length, or by reading one more)."""
    declared = reply.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise ReplyTooLarge(f"reply of {int(declared)} bytes is larger than max_reply_bytes={limit}")
    body = reply.read(limit + 1)
    if len(body) > limit:
        raise ReplyTooLarge(f"reply is larger than max_reply_bytes={limit}")
    return body


class HttpScorer(BaseReward):
    """Client of a `marble-reward/1` server; see the module docstring."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        lo = spec.score_min if spec.score_min is not None else -math.inf
        hi = spec.score_max if spec.score_max is not None else math.inf
        self.score_range = (lo, hi)
        self.range_policy = spec.out_of_range
        self.where = redact_url(spec.url)
        parts = urlsplit(spec.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RewardError(f"reward {self.name!r}: url must be http(s) with a host; got {self.where!r}")
        if (
            spec.token_env
            and parts.scheme == "http"
            and parts.hostname not in ("localhost", "127.0.0.1", "::1")
        ):
            log.warning(
                "reward %r: the bearer token goes to %s over plain http; use https outside a trusted network",
                self.name,
                self.where,
            )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        env = self.spec.token_env
        if env:
            token = os.environ.get(env)
            if not token:
                raise RewardError(
                    f"reward {self.name!r}: token_env={env!r} but the environment variable {env} is empty "
                    f"or unset; in the pipeline it comes from the key {env} of the Kubernetes secret named "
                    "by pipeline.reward_token_secret"
                )
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _attempt(self, request: urllib.request.Request) -> bytes:
        """One request within the deadline `spec.timeout_s`."""
        s = self.spec
        with RequestDeadline(s.timeout_s) as deadline:
            try:
                with build_opener(deadline).open(request, timeout=s.timeout_s) as reply:
                    body = read_capped(reply, s.max_reply_bytes)
            except urllib.error.HTTPError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                socket_timeout = isinstance(exc, TimeoutError) or isinstance(
                    getattr(exc, "reason", None), TimeoutError
                )
                if deadline.expired or socket_timeout:
                    raise TimeoutError(f"no complete reply within timeout_s={s.timeout_s}") from exc
                raise
            if deadline.expired:  # a reply without Content-Length cut short by the watchdog
                raise TimeoutError(f"no complete reply within timeout_s={s.timeout_s}")
        return body

    def _refusal(self, exc: urllib.error.HTTPError) -> RewardError:
        if 300 <= exc.code < 400:
            target = redact_url(exc.headers.get("Location") or "?")
            return RewardError(
                f"reward {self.name!r}: {self.where} redirected (HTTP {exc.code}) to {target}; redirects are "
                "never followed (the bearer token must not travel to another host): set url to the endpoint"
            )
        return RewardError(f"reward {self.name!r}: {self.where} refused the request: HTTP {exc.code}")

    def _post(self, body: bytes) -> bytes:
        s = self.spec
        headers = self._headers()
        last: Exception | None = None
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(s.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(s.url, data=body, headers=headers, method="POST")
            try:
                return self._attempt(request)
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise self._refusal(exc) from None
                last = exc
            except ReplyTooLarge as exc:
                raise RewardError(f"reward {self.name!r}: {self.where}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                last = exc
            log.warning(
                "reward %r: attempt %d/%d to %s failed: %s",
                self.name,
                attempt + 1,
                s.retries + 1,
                self.where,
                redact_text(str(last)),
            )
        raise RewardError(
            f"reward {self.name!r}: {self.where} failed after {s.retries + 1} attempts: {redact_text(str(last))}"
        )

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        body = ScoreRequest(reward=self.name, prompts=prompts, metadata=metadata, images=encode_png(images))
        raw = self._post(body.to_json())
        try:
            reply = ScoreResponse.from_json(raw)
        except (ValueError, ValidationError) as exc:
            raise RewardError(
                f"reward {self.name!r}: {self.where} sent an invalid {SCHEMA} reply: {_short(exc)}"
            ) from None
        if len(reply.scores) != len(prompts):
            raise RewardError(
                f"reward {self.name!r}: {self.where} returned {len(reply.scores)} scores for {len(prompts)} images"
            )
        return torch.tensor([math.nan if v is None else v for v in reply.scores], dtype=torch.float64)


def _short(exc: Exception, limit: int = 300) -> str:
    """An exception's message cut to `limit` characters: a hostile reply must not flood the logs."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."
