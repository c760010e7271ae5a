"""HTTP reward client against a local server: JSON wire format, retries, timeouts, refusals."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from marble.config import HttpReward
from marble.errors import RewardError
from marble.images import to_uint8_hwc
from marble.rewards import build_reward


class _Server:
    """Scores = mean pixel value of each received PNG; `plan` scripts failures for the next requests."""

    def __init__(self):
        self.plan: list[str] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                action = outer.plan.pop(0) if outer.plan else "ok"
                if action == "sleep":
                    time.sleep(0.5)
                if action in ("503", "400"):
                    self.send_response(int(action))
                    self.end_headers()
                    return
                if action == "pickle":
                    payload = pickle.dumps({"schema": "marble-reward/1", "scores": [1.0]})
                else:
                    scores = []
                    for b64 in body["images"]:
                        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64)
                        scores.append(img.mean() / 255.0)
                    if action == "short":
                        scores = scores[:-1]
                    payload = json.dumps({"schema": "marble-reward/1", "scores": scores}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def reward(server, **kw):
    return build_reward(HttpReward(name="remote", url=server.url, backoff_s=0.0, **kw))


IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PROMPTS = ['a sign that says "open"', "a red circle", 'the word "exit"']


def test_round_trip_scores_and_applicability(server, monkeypatch):
    server.plan, server.requests = [], []
    monkeypatch.setenv("MARBLE_TEST_TOKEN", "s3cret")
    r = reward(server, applies_when="quoted_text", token_env="MARBLE_TEST_TOKEN")
    out = r(IMAGES, PROMPTS, [{}, {}, {"k": 1}]).scores
    expected = torch.from_numpy(to_uint8_hwc(IMAGES).astype(np.float64).mean(axis=(1, 2, 3)) / 255.0)
    assert (
        math.isnan(out[1]) and out[0] == pytest.approx(expected[0]) and out[2] == pytest.approx(expected[2])
    )
    (req,) = server.requests  # one request, only the two applicable images
    assert req["body"]["schema"] == "marble-reward/1" and req["body"]["prompts"] == [PROMPTS[0], PROMPTS[2]]
    assert req["body"]["metadata"] == [{}, {"k": 1}] and req["auth"] == "Bearer s3cret"


def test_retries_5xx_then_succeeds(server):
    server.plan, server.requests = ["503", "503"], []
    out = reward(server, retries=2)(IMAGES, PROMPTS, None).scores
    assert torch.isfinite(out).all() and len(server.requests) == 3


def test_gives_up_after_retries_and_does_not_retry_4xx(server):
    server.plan, server.requests = ["503", "503"], []
    with pytest.raises(RewardError, match="failed after 2 attempts"):
        reward(server, retries=1)(IMAGES, PROMPTS, None)
    server.plan, server.requests = ["400"], []
    with pytest.raises(RewardError, match="HTTP 400"):
        reward(server, retries=3)(IMAGES, PROMPTS, None)
    assert len(server.requests) == 1


def test_timeout_is_bounded(server):
    server.plan = ["sleep"]
    with pytest.raises(
        RewardError, match="failed after 1 attempts: no complete reply within timeout_s=0.1"
    ):  # 0.1 s < the server's 0.5 s
        reward(server, retries=0, timeout_s=0.1)(IMAGES, PROMPTS, None)


@pytest.mark.parametrize(("action", "message"), [("pickle", "invalid"), ("short", "2 scores for 3 images")])
def test_invalid_replies_are_refused(server, action, message):
    server.plan = [action]
    with pytest.raises(RewardError, match=message):
        reward(server, retries=0)(IMAGES, PROMPTS, None)


# ------------------------------------------------------------------ the server is not trusted
class _Hostile:
    """A loopback server whose every request is handled by `respond(handler)`; records what it got."""

    def __init__(self, respond):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests.append({"method": self.command, "auth": self.headers.get("Authorization")})
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    respond(self)  # a broken pipe: the client gave up, as it should

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile():
    servers = []

    def start(respond):
        servers.append(_Hostile(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _reply(handler, body: bytes, status: int = 200, length: bool = True, headers=()):
    handler.send_response(status)
    for k, v in headers:
        handler.send_header(k, v)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("code", [302, 307])
def test_redirect_to_another_host_is_refused_and_the_token_stays_home(hostile, monkeypatch, code):
    ok = json.dumps({"schema": "marble-reward/1", "scores": [0.5] * 3}).encode()
    elsewhere = hostile(lambda h: _reply(h, ok))
    # "localhost" and another port: another origin than the configured 127.0.0.1 endpoint
    target = f"http://localhost:{elsewhere.port}/steal"
    start = hostile(lambda h: _reply(h, b"", status=code, headers=[("Location", target)]))
    monkeypatch.setenv("MARBLE_TEST_TOKEN", "s3cret")
    r = build_reward(HttpReward(name="remote", url=start.url, token_env="MARBLE_TEST_TOKEN", retries=2))
    with pytest.raises(RewardError, match=rf"redirected \(HTTP {code}\) to {target}.*never followed"):
        r(IMAGES, PROMPTS, None)
    assert start.requests and elsewhere.requests == []  # nothing, token or not, reached the other host


def test_file_urls_are_refused_and_never_read(tmp_path):
    secret = tmp_path / "token"
    secret.write_text('{"schema": "SERVICE-ACCOUNT-TOKEN-abc123"}')
    with pytest.raises(ValueError, match=r"url\n  Value error, must be an http:// or https:// URL"):
        HttpReward(name="remote", url=secret.as_uri())
    # A spec that skipped validation is refused by the client too, before any read.
    spec = HttpReward.model_construct(**{**HttpReward(name="remote", url="http://x").model_dump(),
                                         "url": secret.as_uri()})  # fmt: skip
    with pytest.raises(RewardError, match="must be http") as err:
        build_reward(spec)(IMAGES, PROMPTS, None)
    assert "SERVICE-ACCOUNT" not in str(err.value)


def test_a_reply_larger_than_the_cap_is_refused(hostile):
    big = json.dumps({"schema": "marble-reward/1", "scores": [0.5] * 3, "pad": "x" * 200_000}).encode()
    server = hostile(lambda h: _reply(h, big))
    unsized = hostile(lambda h: _reply(h, big, length=False))  # no Content-Length: counted while read
    for s in (server, unsized):
        r = build_reward(HttpReward(name="remote", url=s.url, max_reply_bytes=65536, retries=3))
        with pytest.raises(RewardError, match="larger than max_reply_bytes=65536"):
            r(IMAGES, PROMPTS, None)
        assert len(s.requests) == 1  # not retried


def _trickle(handler, where: str):
    """Send a byte every 50 ms, for up to 30 s: each read is quick, the reply never ends."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    if where == "body":
        handler.wfile.write(b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(600):
        handler.wfile.write(b"X" if where == "headers" else b" ")
        handler.wfile.flush()
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_server_hits_the_request_deadline(hostile, where):
    server = hostile(lambda h: _trickle(h, where))
    r = build_reward(HttpReward(name="remote", url=server.url, timeout_s=0.5, retries=1, backoff_s=0.0))
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"failed after 2 attempts: no complete reply within timeout_s=0.5"):
        r(IMAGES, PROMPTS, None)
    # Two attempts of at most 0.5 s each; without the deadline each attempt lasts the whole 30 s trickle.
    assert time.monotonic() - t0 < 10


def test_deeply_nested_json_is_a_clean_error(hostile):
    nested = b'{"schema": "marble-reward/1", "scores": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    server = hostile(lambda h: _reply(h, nested))
    r = build_reward(HttpReward(name="remote", url=server.url, retries=0))
    with pytest.raises(RewardError, match="invalid marble-reward/1 reply: reply JSON is nested too deeply"):
        r(IMAGES, PROMPTS, None)


@pytest.mark.parametrize(
    ("policy", "expected"), [("refuse", [math.nan, 0.5, math.nan]), ("clamp", [1.0, 0.5, 0.0])]
)
def test_out_of_range_scores_are_refused_or_clamped_and_counted(hostile, policy, expected):
    from marble.rewards import score_all

    body = json.dumps({"schema": "marble-reward/1", "scores": [7.5, 0.5, -1e9]}).encode()
    server = hostile(lambda h: _reply(h, body))
    spec = HttpReward(name="remote", url=server.url, score_min=0.0, score_max=1.0, out_of_range=policy)
    counts: dict[str, int] = {}
    scores = score_all([build_reward(spec)], IMAGES, PROMPTS, None, out_of_range_counts=counts)[:, 0]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    assert counts == {"remote": 2}


def test_a_named_token_variable_that_is_empty_is_an_error_not_an_anonymous_request(server, monkeypatch):
    server.plan, server.requests = [], []
    monkeypatch.delenv("MARBLE_TEST_TOKEN", raising=False)
    with pytest.raises(RewardError, match="token_env='MARBLE_TEST_TOKEN'.*pipeline.reward_token_secret"):
        reward(server, token_env="MARBLE_TEST_TOKEN")(IMAGES, PROMPTS, None)
    assert server.requests == []
