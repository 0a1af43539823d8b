"""`registry_auth` on its way to the replicas: through Ray's internal KV, never through the Serve config.

The Serve config (the application's `args`) is readable by anyone who can reach the dashboard API
(`GET /api/serve/applications/`, `ray-dstack status --json`), so the password cannot travel there. `deploy`
writes `{"username", "password"}` under a fresh random key (`registry-auth/<service>/<random>`, namespace
`ray-dstack`) in the cluster's internal KV (the GCS, through a `GcsClient`: no driver, no job); the Serve
config carries only that key and the user name; the replica reads the KV entry when it pulls
(ray_dstack/serve/runtime/container_prepare.py). No dashboard route lists or reads the internal KV. A successful
deploy removes the service's older entries, a failed one its new entry, `delete` all of the service's.

The KV lives in the GCS on the head node: `deploy` reaches it at `$RAY_DSTACK_GCS_ADDRESS` (host:port), else the
local cluster's (`ray start --head` on this machine), else the dashboard's host on port 6379.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from urllib.parse import urlparse

from ray_dstack.errors import RayDstackError
from ray_dstack.spec import KV_NAMESPACE, REGISTRY_AUTH_KEY_PREFIX as KEY_PREFIX

GCS_ADDRESS_ENV = "RAY_DSTACK_GCS_ADDRESS"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def new_key(service: str) -> str:
    return f"{KEY_PREFIX}{service}/{secrets.token_hex(12)}"


def gcs_address(dashboard_address: str) -> str:
    explicit = os.environ.get(GCS_ADDRESS_ENV, "").strip()
    if explicit:
        return explicit
    host = urlparse(dashboard_address).hostname or "127.0.0.1"
    if host in LOOPBACK:
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            return canonicalize_bootstrap_address_or_die("auto")  # the local head's GCS, whatever its port
        except Exception:  # noqa: BLE001 - no local cluster file: fall back to the default port
            pass
    return f"{host}:6379"


def connect_gcs(address: str, purpose: str):
    """A `GcsClient` for the cluster's GCS at `address`, checked reachable; RayDstackError saying where it tried
    (and how to point elsewhere) otherwise. `purpose` completes "cannot reach the cluster's GCS at X to ..."."""
    try:
        # A GcsClient retries an address that refuses for ~40 s; a plain connect says so in a few.
        host, _, port = address.rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        # Ray 2.60 clusters started where a token exists (~/.ray/auth_token) want it; Ray's own drivers
        # turn token mode on the same way before they talk to the GCS.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._raylet import GcsClient

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)

        gcs = GcsClient(address=address)
        gcs.internal_kv_keys(KEY_PREFIX.encode(), KV_NAMESPACE, timeout=10)  # reachable?
        return gcs
    except Exception as exc:  # noqa: BLE001 - any failure: say where we tried and how to point elsewhere
        raise RayDstackError(
            f"cannot reach the cluster's GCS at {address} to {purpose} ({type(exc).__name__}); "
            f"set {GCS_ADDRESS_ENV}=<head>:<gcs port> (default port 6379)"
        ) from None


class CredentialStore:
    """A connection to the cluster's GCS for the duration of one command."""

    def __init__(self, dashboard_address: str) -> None:
        self.address = gcs_address(dashboard_address)
        self._gcs = connect_gcs(self.address, "hand `registry_auth` to the replicas")

    def put(self, key: str, username: str, password: str) -> None:
        value = json.dumps({"username": username, "password": password}).encode()
        self._gcs.internal_kv_put(key.encode(), value, True, KV_NAMESPACE, timeout=10)

    def keys(self, service: str) -> list[str]:
        raw = self._gcs.internal_kv_keys(f"{KEY_PREFIX}{service}/".encode(), KV_NAMESPACE, timeout=10)
        return [k.decode() for k in raw]

    def forget(self, service: str, keep: str | None = None) -> int:
        """Delete the service's entries except `keep`; returns how many went."""
        gone = 0
        for key in self.keys(service):
            if key != keep:
                gone += self._gcs.internal_kv_del(key.encode(), False, KV_NAMESPACE, timeout=10)
        return gone

    def delete(self, key: str) -> None:
        self._gcs.internal_kv_del(key.encode(), False, KV_NAMESPACE, timeout=10)
