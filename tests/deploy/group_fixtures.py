"""Dashboard-shaped details (`GET /api/serve/applications/`) of services with replica groups, for the tests of
`status`, `deploy` and `logs` (built from real plans, so the app's `deployed_app_config` is what deploy PUTs)."""

from __future__ import annotations

import json
from typing import Any

from ray_dstack.config import parse_service
from ray_dstack.deploy.dashboard import ClusterError
from ray_dstack.plan import build_plan
from ray_dstack.serve.groups.sglang_sync import STATE_LOG_MARKER

ROUTER_SVC = """type: service
name: chat
port: 8000
groups:
  - name: router
    replicas: 1
    router: {type: ROUTER}
    commands: [smg launch --port $RAY_DSTACK_PORT]
  - name: workers
    replicas: 1..3
    scaling: {metric: rps, target: 10}
    commands: [serve --port $RAY_DSTACK_PORT]
probes:
  - type: http
    url: /health
model: {type: chat, name: m1, format: openai}
"""

MEMBERS_SVC = """type: service
name: chat
port: 8000
groups:
  - name: a
    replicas: 1
    commands: [serve --port $RAY_DSTACK_PORT]
  - name: b
    replicas: 2
    commands: [serve --port $RAY_DSTACK_PORT]
"""


def plan_of(text: str, router: str = "sglang"):
    return build_plan(parse_service(text.replace("ROUTER", router), "chat.dstack.yml"), token_sha256="ab" * 32)


def app_config(text: str = ROUTER_SVC, router: str = "sglang") -> dict[str, Any]:
    return plan_of(text, router).application()


def replica(rid: str, state: str = "RUNNING", node: str = "n1", ip: str = "10.0.0.1") -> dict[str, Any]:
    placed = state not in ("PENDING_ALLOCATION",)
    return {"replica_id": rid, "state": state, "node_id": node if placed else None, "node_ip": ip if placed else None,
            "pid": 1, "log_file_path": f"/serve/{rid}.log" if placed else None}


def deployment(replicas: list[dict[str, Any]], target: int | None = None, status: str = "HEALTHY",
               message: str = "") -> dict[str, Any]:
    return {"status": status, "message": message, "replicas": replicas,
            "target_num_replicas": len(replicas) if target is None else target}


def app(cfg: dict[str, Any], deployments: dict[str, Any], status: str = "RUNNING", message: str = "",
        deployed: float = 2.0) -> dict[str, Any]:
    return {"status": status, "message": message, "route_prefix": "/chat", "deployed_app_config": cfg,
            "last_deployed_time_s": deployed, "deployments": deployments}


def details(apps: dict[str, Any]) -> dict[str, Any]:
    return {"http_options": {"host": "0.0.0.0", "port": 8100}, "applications": apps}


def router_line(state: dict[str, Any]) -> str:
    return f"INFO 2026-12-06 sglang_sync.py:70 -- {STATE_LOG_MARKER}{json.dumps(state, sort_keys=True)}\n"


NO_WORKERS = {"type": "sglang", "workers": [], "adding": [],
              "last_error": "the router does not answer GET /workers yet (ConnectError: connection refused)"}
TWO_WORKERS = {"type": "sglang", "last_error": None, "adding": ["http://10.0.0.3:40002"], "workers": [
    {"url": "http://10.0.0.2:40001", "worker_type": "regular", "healthy": True},
    {"url": "http://10.0.0.4:40003", "worker_type": "prefill", "healthy": False}]}


class FakeClient:
    """The dashboard's log API (by file name), its Serve details and nodes; records what was asked."""

    def __init__(self, logs: dict[str, str] | None = None, serve: list[dict[str, Any]] | None = None,
                 nodes: list[dict[str, Any]] | None = None) -> None:
        self.logs = logs or {}
        self.serve = serve or []
        self._nodes = nodes or []
        self.asked: list[str] = []
        self.put: list[dict[str, Any]] = []
        self.address = "http://head.example:8265"

    def __enter__(self) -> "FakeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def metrics_targets(self) -> list[str]:
        return []

    def is_fixed_size(self) -> bool:
        return True

    def log(self, *, node_id: str, filename: str, lines: int = 1000) -> str:
        self.asked.append(filename)
        if filename not in self.logs:
            raise ClusterError("gone")
        return self.logs[filename]

    def serve_details(self) -> dict[str, Any]:
        return self.serve.pop(0) if len(self.serve) > 1 else self.serve[0]

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes

    def put_applications(self, config: dict[str, Any]) -> None:
        self.put.append(config)
