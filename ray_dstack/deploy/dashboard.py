"""A client of the Ray dashboard's REST API: Serve applications, nodes and logs.

ray-dstack talks to a cluster only through this API (the same one `serve deploy` uses), so a laptop can
drive a remote cluster with nothing but its dashboard address. Ray 2.60 clusters may require Ray's own
auth token: it is read like Ray reads it (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ray_dstack.errors import RayDstackError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class ClusterError(RayDstackError):
    """The cluster could not be reached, or refused a request."""


def ray_auth_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ClusterError(
            f"--address {address!r}: give the Ray dashboard's HTTP address (e.g. http://<head>:8265), "
            "not a Ray Client address"
        )
    if not address.startswith(("http://", "https://")):
        address = "http://" + address
    return address


class DashboardClient:
    def __init__(self, address: str, *, timeout_s: float = 30.0, token: str | None = None) -> None:
        """`token`: the cluster's Ray auth token; by default read where Ray reads it (`ray_auth_token`)."""
        self.address = normalize_address(address)
        headers = {}
        token = token or ray_auth_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.address, headers=headers, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DashboardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address}: {exc.__class__.__name__}: {exc}. "
                "Is the cluster up (`ray start --head` / `ray up cluster.yaml`) and is the address right?"
            ) from None
        if resp.status_code in (401, 403):
            hint = (
                "the cluster has Ray token auth on: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
                "cluster's token"
            )
            raise ClusterError(f"the Ray dashboard at {self.address} refused the request ({resp.status_code}): {hint}")
        return resp

    def ping(self) -> bool:
        try:
            resp = self._http.get("/api/ray/version", timeout=3.0)
        except httpx.HTTPError:
            return False
        return resp.status_code in (200, 401, 403)

    def ray_version(self) -> str | None:
        resp = self._request("GET", "/api/ray/version")
        if resp.status_code != 200:
            return None
        return resp.json().get("ray_version")

    def serve_details(self) -> dict[str, Any]:
        resp = self._request("GET", "/api/serve/applications/")
        if resp.status_code != 200:
            raise ClusterError(f"reading Serve applications failed ({resp.status_code}): {resp.text.strip()}")
        return resp.json()

    def put_applications(self, config: dict[str, Any]) -> None:
        resp = self._request("PUT", "/api/serve/applications/", json=config, timeout=120.0)
        if resp.status_code != 200:
            raise ClusterError(f"Serve rejected the configuration ({resp.status_code}): {resp.text.strip()}")

    def put_package(self, uri: str, data: bytes) -> None:
        """Store a zip in Ray's package store (the GCS's internal KV, key `uri`), as `ray job submit
        --working-dir` does. Never GET it to test existence: that pins it with a temporary reference, and the GCS
        deletes a package whose references drop back to 0 (ray_dstack/deploy/package_store.py)."""
        protocol, sep, name = uri.partition("://")
        if not sep or not name or "/" in name:
            raise ValueError(f"not a package URI: {uri!r}")
        resp = self._request("PUT", f"/api/packages/{protocol}/{name}", content=data, timeout=300.0)
        if resp.status_code != 200:
            raise ClusterError(f"uploading {uri} ({len(data)} bytes) failed ({resp.status_code}): "
                               f"{resp.text.strip()[-500:]}")

    def nodes(self) -> list[dict[str, Any]]:
        resp = self._request("GET", "/api/v0/nodes", params={"detail": "true", "limit": 1000})
        if resp.status_code != 200:
            raise ClusterError(f"listing nodes failed ({resp.status_code}): {resp.text.strip()}")
        body = resp.json()
        return body.get("data", {}).get("result", {}).get("result", [])

    def metrics_targets(self) -> list[str]:
        """`host:port` of every node's Prometheus endpoint (Ray's service discovery for Prometheus)."""
        try:
            resp = self._request("GET", "/api/prometheus/sd")
        except ClusterError:
            return []
        if resp.status_code != 200:
            return []
        return [t for group in resp.json() or [] for t in group.get("targets", [])]

    def scrape(self, target: str, timeout_s: float = 3.0) -> str:
        try:
            resp = httpx.get(f"http://{target}/metrics", timeout=timeout_s, trust_env=False)
        except httpx.HTTPError:
            return ""
        return resp.text if resp.status_code == 200 else ""

    def is_fixed_size(self) -> bool:
        """True when no autoscaler can add nodes: Ray's monitor then runs read-only and reports each node
        as its own type `node_<id>`. A real autoscaler (v1 with a config, or v2) never looks like that."""
        try:
            resp = self._request("GET", "/api/cluster_status")
        except ClusterError:
            return False
        if resp.status_code != 200:
            return False
        data = (resp.json() or {}).get("data") or {}
        report = (data.get("clusterStatus") or {}).get("autoscalerReport") or {}
        mapping = report.get("nodeTypeMapping") or {}
        return bool(report.get("legacy")) and bool(mapping) and all(
            str(t).startswith("node_") for t in mapping.values()
        )

    def log(self, *, node_id: str, filename: str, lines: int = 1000) -> str:
        params = {"node_id": node_id, "filename": filename.lstrip("/"), "lines": lines}
        resp = self._request("GET", "/api/v0/logs/file", params=params, timeout=60.0)
        if resp.status_code != 200:
            raise ClusterError(f"reading log {filename} failed ({resp.status_code}): {resp.text.strip()}")
        return resp.text

    def follow_log(self, *, node_id: str, filename: str, lines: int = 100) -> Iterator[str]:
        params = {"node_id": node_id, "filename": filename.lstrip("/"), "lines": lines, "interval": 0.5}
        try:
            with self._http.stream("GET", "/api/v0/logs/stream", params=params, timeout=None) as resp:
                if resp.status_code != 200:
                    raise ClusterError(f"following log {filename} failed ({resp.status_code})")
                yield from resp.iter_text()
        except httpx.HTTPError as exc:
            raise ClusterError(f"log stream from {self.address} broke off: {exc}") from None
