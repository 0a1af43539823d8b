"""Every default the plan applies, in one place."""

from __future__ import annotations

# Serve's own default (5) throttles a proxying replica 5–7× (docs: shared/notes/environment.md).
MAX_ONGOING_REQUESTS = 256

# When the YAML does not set `cpu` / `memory`, dstack means `cpu: 2..`, `memory: 8GB..`. Requesting that
# from Ray would leave every replica unschedulable on a laptop or a 2-core CI box, so the plan requests
# a small CPU share and no memory reservation, and shows dstack's default as an advisory requirement.
# When the YAML sets them, the plan requests exactly the minimums the YAML asks for (hard requests).
# The share is a scheduling weight, not a limit (a replica may use more while the cores are free):
# - small enough that a 2-core laptop's local head (Ray advertises its cores, 2) holds 12 idle one-replica
#   services next to the demo model's `cpu: 1` (12 x 0.05 + 1 = 1.6 CPU; 40 services alone). 0.5 filled
#   it with 4 services, while an idle `python3 -m http.server` service costs ~2.5 % of a core (its Serve
#   replica ~1.4 %, the rest in Ray's own processes) and ~170 MiB, measured with 12 and 40 on 2 cores:
#   0.05 is twice that, so a node admits no more idle services than its cores can run;
# - not 0: Ray still counts it, so a node holds at most 20 such replicas per core, Serve's SPREAD places
#   them across the nodes that have CPUs, a head started with `--num-cpus 0` gets none, and on an
#   autoscaling cluster a replica that fits nowhere is a demand the autoscaler acts on.
DEFAULT_NUM_CPUS = 0.05
DEFAULT_MEMORY_BYTES: int | None = None

# Replica health checking and shutdown (Serve deployment options). Serve stops routing to a replica whose
# backend died only after 3 failed checks, so a short period keeps that window (and the gateway's
# retries into it) to a few seconds; a check is one cheap request to the backend.
HEALTH_CHECK_PERIOD_S = 1.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Drain: a replica being removed gets no new requests and waits up to this long (`stop_duration`, or
# `deploy --drain-timeout`) for its in-flight requests and streams before its process is stopped; it checks
# every WAIT_LOOP seconds. dstack's `stop_duration` default, 5m: it only matters while requests are in flight.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 300.0
GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 0.5

# Autoscaling: dstack's delays are enforced by our policy (written by the autoscaling package), so Serve's
# own delays are 0 and Serve just follows the policy's answer.
AUTOSCALING_POLICY = "ray_dstack.serve.scaling.autoscaling_policy:rps_policy"
SERVE_UPSCALE_DELAY_S = 0.0
SERVE_DOWNSCALE_DELAY_S = 0.0
SERVE_DOWNSCALE_TO_ZERO_DELAY_S = 0.0
# Replicas report their request counts this often; the policy reads the newest point of each.
METRICS_INTERVAL_S = 1.0
# Serve averages its metrics over this period; the policy averages RPS over `scaling.window` itself.
LOOK_BACK_PERIOD_S = 5.0

# Node label Ray sets from the detected GPU (and that cluster.yaml sets explicitly); GPU names/memory
# become a hard `label_selector` on it.
ACCELERATOR_LABEL_KEY = "ray.io/accelerator-type"

# Env keys whose values never appear in printed output.
SECRET_ENV_KEY_MARKERS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL")
REDACTED = "***"


def routing(explicit: str | None, *, model: bool, rate_limits: bool, router: bool) -> str:
    """The `routing` policy a service gets. Without one in the YAML: `prefix` for a model service (measured on a
    real engine with a prefix cache, 2 replicas, 8 conversations of 5 turns with users' pauses: 5.5x lower time to
    first token p50 than least connections, the same without pauses or shared prefixes: bench/RESULTS.md "Prefix
    routing on a real engine"), unless its `rate_limits` (enforced per replica as a share: they need requests
    spread evenly) or a router group (which picks the worker itself) rule it out."""
    if explicit is not None:
        return explicit
    return "prefix" if model and not rate_limits and not router else "least_connections"
