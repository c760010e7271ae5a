"""A fake Kubernetes API server on 127.0.0.1 for the PyTorchJob launcher, spoken to by the real
`kubernetes` client. It can fail: it refuses a PyTorchJob that breaks the vendored Training Operator
CRD schema (422, as an API server with the CRD installed does), answers any request with a chosen error
(e.g. 403 for missing RBAC), and plays a scripted job life (Created, Running, Succeeded / Failed, or
Running for ever). Reaching Succeeded runs `on_success(job)`, standing in for the replicas' work."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from _kube_contracts import pytorchjob_errors

JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


class FakeKube:
    def __init__(
        self,
        script: list[str],
        *,
        on_success: Callable[[dict], None] | None = None,
        fail: dict[str, int] | None = None,
    ) -> None:
        self.script, self.on_success, self.fail = list(script), on_success, fail or {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self._gets: dict[str, int] = {}
        self._t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> FakeKube:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> Any:
        from kubernetes import client

        conf = client.Configuration(host=self.url)
        return client.ApiClient(conf)

    def kubeconfig(self, path) -> str:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: u, user: {}}]\ncontexts: [{name: fake, context: {cluster: fake, user: u}}]\n"
        )
        return str(path)

    def seen(self, method: str) -> list[str]:
        return [p for m, p in self.requests if m == method]

    # ------------------------------------------------------------------ job life
    def state_of(self, name: str) -> str:
        n = self._gets.get(name, 0)
        return self.script[min(n, len(self.script) - 1)]

    def _advance(self, name: str) -> dict[str, Any]:
        job = self.jobs[name]
        state = self.state_of(name)
        self._gets[name] = self._gets.get(name, 0) + 1
        kind, _, rest = state.partition(":")
        reason, _, message = rest.partition(":")
        conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]
        if kind != "Created":
            conditions.append({"type": kind, "status": "True", "reason": reason or kind, "message": message})
        if kind == "Succeeded" and not job.get("_done") and self.on_success:
            job["_done"] = True
            self.on_success(job)
        return {**{k: v for k, v in job.items() if k != "_done"}, "status": {"conditions": conditions}}

    def _log(self, name: str) -> str:
        n = self._gets.get(name, 0)
        stamp = lambda i: (self._t0 + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")  # noqa: E731
        return "".join(f"{stamp(i)} step {i} loss 0.{i}\n" for i in range(n))

    # ------------------------------------------------------------------ HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": code,
                        "message": message,
                    },
                )

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                fake.requests.append((method, url.path))
                if method in fake.fail:
                    return self._status(fake.fail[method], f"{method} refused by the fake API")
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                query = parse_qs(url.query)
                if m := JOBS.match(url.path):
                    return self._jobs(method, m.group(2), body, query)
                if PODS.match(url.path) and method == "GET":
                    selector = query.get("labelSelector", [""])[0]
                    name = dict(kv.split("=") for kv in selector.split(",")).get(
                        "training.kubeflow.org/job-name"
                    )
                    items = [{"metadata": {"name": f"{name}-master-0"}}] if name in fake.jobs else []
                    return self._send(
                        200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                    )
                if (m := LOG.match(url.path)) and method == "GET":
                    return self._send(200, fake._log(m.group(2).removesuffix("-master-0")), "text/plain")
                return self._status(404, f"no route {method} {url.path}")

            def _jobs(self, method: str, name: str | None, body: dict, query: dict) -> None:
                if method == "POST":
                    errors = pytorchjob_errors(body)
                    if errors:
                        return self._status(422, "PyTorchJob is invalid: " + "; ".join(errors))
                    if body["metadata"]["name"] in fake.jobs:
                        return self._status(409, "already exists")
                    fake.jobs[body["metadata"]["name"]] = body
                    fake._gets.setdefault(body["metadata"]["name"], 0)  # a replaced job continues the script
                    fake.created.append(body)
                    return self._send(201, body)
                if method == "GET" and name is None:
                    selector = query.get("labelSelector", [""])[0]
                    key, _, value = selector.partition("=")
                    items = [
                        fake._advance(n)
                        for n, j in list(fake.jobs.items())
                        if j["metadata"]["labels"].get(key) == value
                    ]
                    return self._send(
                        200, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJobList", "items": items}
                    )
                if name not in fake.jobs:
                    return self._status(404, f"pytorchjobs {name} not found")
                if method == "GET":
                    return self._send(200, fake._advance(name))
                if method == "DELETE":
                    del fake.jobs[name]
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                return self._status(405, method)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler
