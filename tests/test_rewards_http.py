"""HTTP reward client against a local server: JSON wire format, retries, timeouts, refusals."""

from __future__ import annotations

import base64
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
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


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
    with pytest.raises(RewardError, match="failed after 1 attempts.*timed out"):  # 0.1 s < the server's 0.5 s
        reward(server, retries=0, timeout_s=0.1)(IMAGES, PROMPTS, None)


@pytest.mark.parametrize(("action", "message"), [("pickle", "invalid"), ("short", "2 scores for 3 images")])
def test_invalid_replies_are_refused(server, action, message):
    server.plan = [action]
    with pytest.raises(RewardError, match=message):
        reward(server, retries=0)(IMAGES, PROMPTS, None)
