"""The packed `files` / local `repos` (ray_dstack/deploy/uploads.py) in Ray's package store, and their clean-up.

Upload: the dashboard's `PUT /api/packages/gcs/<name>` (what `ray job submit --working-dir` does), which writes
the zip into the GCS's internal KV under its URI, namespace "" (Python's `namespace=None`: Ray's packaging.py
calls `_internal_kv_put(pkg_uri, data)`). A replica reads it back with `_internal_kv_get(uri)`.

Existence is checked in that KV (a `GcsClient`, as deploy/registry_auth.py opens one), never with the
dashboard's `GET /api/packages/...`: that call pins the URI with a *temporary* reference (job_head.py
`get_package` → `pin_runtime_env_uri`, 10 minutes), and when the GCS's runtime-env manager sees a `gcs://` URI's
references drop to 0 it deletes the package (gcs_server.cc `InitRuntimeEnvManager`'s deleter). A package
uploaded here is referenced by no runtime_env (the replicas read it themselves), so Ray never deletes it: it
stays until ray-dstack does.

So ray-dstack keeps a record per service in its own KV namespace, `uploads/<service>` → `{"uris": [...]}`, and
deletes a package once no service's record lists it:
- deploy: before the Serve config goes out the record lists the running version's URIs and the new ones (a
  rollback re-deploys the running version, whose replicas unpack its packages again); once the new version is
  ready (or submitted with `--detach`: no rollback then) only the new ones, and the running version's go unless
  another service lists them; a failed deploy puts the record back and drops the new ones;
- delete: the record goes, and its packages unless another service lists them.
A deploy that dies half-way leaves both versions listed; the service's next deploy or delete clears them.
Two services deploying the same content at the same instant could race (one deletes a URI the other has just
found present); packages are per content, so that takes identical files in two services deployed together.
"""

from __future__ import annotations

import json
from typing import Any

from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.deploy.registry_auth import connect_gcs, gcs_address
from ray_dstack.deploy.uploads import Packed
from ray_dstack.spec import KV_NAMESPACE

RECORD_PREFIX = "uploads/"
PACKAGE_NAMESPACE = None  # Ray's packages live in the KV's default namespace ""
_TIMEOUT_S = 10


def record_key(service: str) -> bytes:
    return f"{RECORD_PREFIX}{service}".encode()


class PackageStore:
    """Uploads, records and clean-up for one command; `gcs`: a GcsClient (default: the cluster's, by address)."""

    def __init__(self, client: DashboardClient, gcs: Any = None) -> None:
        self.client = client
        self._gcs = gcs if gcs is not None else connect_gcs(gcs_address(client.address), "upload `files`")

    # --- packages -------------------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        return bool(self._gcs.internal_kv_exists(uri.encode(), PACKAGE_NAMESPACE, timeout=_TIMEOUT_S))

    def upload(self, packed: list[Packed]) -> list[str]:
        """Upload what the cluster does not hold yet; returns the URIs uploaded now."""
        sent: list[str] = []
        for item in packed:
            uri = item.spec.uri
            if uri in sent or self.exists(uri):
                continue
            self.client.put_package(uri, item.data)
            sent.append(uri)
        return sent

    # --- records --------------------------------------------------------------------------------------

    def record(self, service: str) -> list[str]:
        raw = self._gcs.internal_kv_get(record_key(service), KV_NAMESPACE, timeout=_TIMEOUT_S)
        return _uris(raw)

    def _write(self, service: str, uris: list[str]) -> None:
        value = json.dumps({"uris": sorted(set(uris))}).encode()
        self._gcs.internal_kv_put(record_key(service), value, True, KV_NAMESPACE, timeout=_TIMEOUT_S)

    def records(self) -> dict[str, list[str]]:
        """Every service's record."""
        keys = self._gcs.internal_kv_keys(RECORD_PREFIX.encode(), KV_NAMESPACE, timeout=_TIMEOUT_S)
        if not keys:
            return {}
        values = self._gcs.internal_kv_multi_get(list(keys), KV_NAMESPACE, timeout=_TIMEOUT_S)
        return {k.decode()[len(RECORD_PREFIX):]: _uris(v) for k, v in values.items()}

    # --- a deploy's steps -----------------------------------------------------------------------------

    def begin(self, service: str, packed: list[Packed]) -> list[str]:
        """Record the new URIs beside the running version's, then upload. Returns the running version's."""
        previous = self.record(service)
        uris = [p.spec.uri for p in packed]
        if set(uris) - set(previous):
            self._write(service, previous + uris)
        self.upload(packed)
        return previous

    def commit(self, service: str, packed: list[Packed], previous: list[str]) -> list[str]:
        """The new version runs: its URIs only; returns the packages deleted."""
        uris = [p.spec.uri for p in packed]
        if uris:
            self._write(service, uris)
        else:
            self._delete_record(service)
        return self.collect(previous + uris)

    def abort(self, service: str, packed: list[Packed], previous: list[str]) -> list[str]:
        """The new version was rolled back: the running version's URIs again; returns the packages deleted."""
        if previous:
            self._write(service, previous)
        else:
            self._delete_record(service)
        return self.collect([p.spec.uri for p in packed])

    def forget(self, service: str) -> list[str]:
        """`delete`: the service's record and the packages no other service lists; returns those deleted."""
        uris = self.record(service)
        self._delete_record(service)
        return self.collect(uris)

    def _delete_record(self, service: str) -> None:
        self._gcs.internal_kv_del(record_key(service), False, KV_NAMESPACE, timeout=_TIMEOUT_S)

    def collect(self, candidates: list[str]) -> list[str]:
        """Delete the candidates no service's record lists."""
        listed = {uri for uris in self.records().values() for uri in uris}
        gone = []
        for uri in sorted(set(candidates) - listed):
            if self._gcs.internal_kv_del(uri.encode(), False, PACKAGE_NAMESPACE, timeout=_TIMEOUT_S):
                gone.append(uri)
        return gone


def _uris(raw: bytes | None) -> list[str]:
    if not raw:
        return []
    try:
        uris = json.loads(raw).get("uris") or []
    except (ValueError, AttributeError):
        return []  # not a record ray-dstack wrote
    return [u for u in uris if isinstance(u, str) and u.startswith("gcs://")]
