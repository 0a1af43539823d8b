"""Read what the RPS policy last measured and decided, from any driver connected to the Ray cluster.

The policy runs inside the Serve controller and publishes (about once a second, and at once when its answer
changes) a JSON record to Ray's internal KV; see `ray_dstack/serve/autoscaling_policy.py`. Requires `ray.init()`
(or `ray.init(address=...)`) to have been called.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ray_dstack.serve.autoscaling_policy import KV_NAMESPACE, status_key

# A record older than this was not refreshed by the controller: the deployment is gone or not autoscaled.
STALE_AFTER_S = 15.0


def read_status(app_name: str, deployment_name: str = "ServiceReplica") -> dict[str, Any] | None:
    """`{"rps", "desired", "target_num_replicas", "running_replicas", "target_rps", "window_s", "updated_at",
    "age_s", "stale"}` for one deployment, or None when the policy never published for it."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        raise RuntimeError("read_status() needs a connected Ray driver (call ray.init first)")
    raw = internal_kv._internal_kv_get(status_key(app_name, deployment_name), namespace=KV_NAMESPACE)
    if not raw:
        return None
    record = json.loads(raw)
    age = max(0.0, time.time() - float(record.get("updated_at", 0.0)))
    record["age_s"] = age
    record["stale"] = age > STALE_AFTER_S
    return record
