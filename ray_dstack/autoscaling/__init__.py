"""dstack's `scaling: {metric: rps}` on Ray Serve: per-replica request counting and a custom Serve policy.

- `counter.RequestCounter`: used inside each replica; its `stats()` is what `record_autoscaling_stats()` returns.
- `policy.rps_policy` (import path `policy.POLICY_IMPORT_PATH`): the Serve autoscaling policy;
  `policy.desired_replicas` is dstack's decision rule as a pure function.
- `status.read_status`: the policy's last measured RPS / decision, for `ray-dstack status`.
"""

from ray_dstack.autoscaling.counter import IGNORED_STATUS_CODES, RequestCounter
from ray_dstack.autoscaling.policy import POLICY_IMPORT_PATH, desired_replicas, policy_kwargs

__all__ = ["IGNORED_STATUS_CODES", "POLICY_IMPORT_PATH", "RequestCounter", "desired_replicas", "policy_kwargs"]
