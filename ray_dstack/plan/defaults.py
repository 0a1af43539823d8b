"""Every default the plan applies, in one place."""

from __future__ import annotations

# Serve's own default (5) throttles a proxying replica 5–7× (docs: shared/notes/environment.md).
MAX_ONGOING_REQUESTS = 256

# When the YAML does not set `cpu` / `memory`, dstack means `cpu: 2..`, `memory: 8GB..`. Requesting that
# from Ray would leave every replica unschedulable on a laptop or a 2-core CI box, so the plan requests
# a small CPU share and no memory reservation, and shows dstack's default as an advisory requirement.
# When the YAML sets them, the plan requests exactly the minimums the YAML asks for.
DEFAULT_NUM_CPUS = 0.5
DEFAULT_MEMORY_BYTES: int | None = None

# Replica health checking and shutdown (Serve deployment options). Serve stops routing to a replica whose
# backend died only after 3 failed checks, so a short period keeps that window (and the gateway's
# retries into it) to a few seconds; a check is one cheap request to the backend.
HEALTH_CHECK_PERIOD_S = 1.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Drain: a replica being removed gets no new requests and waits up to this long (`deploy --drain-timeout`)
# for its in-flight requests and streams before its process is stopped; it checks every WAIT_LOOP seconds.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0
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
