"""dstack's RPS autoscaler as a Ray Serve 2.60 custom autoscaling policy.

dstack's rule (`scaling: {metric: rps, target, scale_up_delay, scale_down_delay}`, window 60 s)
------------------------------------------------------------------------------------------------
`rps = requests in the window / window`, `desired = ceil(rps / target)` clipped to `[min, max]`. If that is
more than the current desired count: from 0 scale up at once; otherwise only when `scale_up_delay` has passed
since the LAST SCALING EVENT (either direction). If less: only when `scale_down_delay` has passed since the
last scaling event. `desired_replicas()` is exactly that rule, as a pure function.

How it is wired into Serve (checked against the installed ray 2.60 source)
--------------------------------------------------------------------------
- `autoscaling_config.policy = {"policy_function": "ray_dstack.serve.scaling.autoscaling_policy:rps_policy",
  "policy_kwargs": {"target_rps": ..., "window_s": ..., "scale_up_delay_s": ..., "scale_down_delay_s": ...}}`.
  Serve 2.60 forwards `policy_kwargs` **only when the policy is a class** (`_resolve_policy_callable`
  instantiates it once with the kwargs and then calls `instance(ctx)` every control-loop tick, ~0.1 s); a
  plain function would get `ctx` alone and the kwargs would be silently dropped. So `rps_policy` is a class
  (`RpsPolicy`); `evaluate(ctx, **kwargs)` is the same logic as a function.
- The policy returns `(desired: int, policy_state: dict)`; Serve keeps `policy_state` in the controller's
  memory (not checkpointed; reset to `{}` whenever the deployment is re-registered: redeploy, config change,
  controller restart) and hands it back as `ctx.policy_state` on the next tick. Ours lives under
  `policy_state["ray_dstack"]`.
- Serve pickles the policy **by value** (`cloudpickle.register_pickle_by_value` on this module), so this module
  imports nothing from `ray_dstack` (only the stdlib, and `ray` lazily).
- Measuring: each replica returns `RequestCounter.stats()` from `record_autoscaling_stats()`. Serve records
  it every `min(0.2 * look_back_period_s, metrics_interval_s)` s into a time series trimmed to
  `look_back_period_s`, pushes it every `metrics_interval_s` s, and keeps only the latest report per replica,
  and only for RUNNING replicas: a stopped replica's report is deleted (`on_replica_stopped`).
  `ctx.aggregated_metrics[name][replica]` is the time-weighted MEAN of that series over the look-back window
  (useless for a counter); `ctx.raw_metrics[name][replica]` is the series itself. The policy reads the last
  point of each replica's monotonic `ray_dstack_requests_total`, adds the increase since the previous tick
  to its own 1-second frames (in `policy_state`), and sums the frames of the window. Requests served by a
  replica that has since stopped therefore stay counted until they leave the window, like dstack's count at
  the proxy; only requests a replica served after its last push (< `metrics_interval_s`) are lost when it
  stops. After a state reset the frames are seeded from the replicas' own `ray_dstack_requests_in_window`.
- Last scaling event: `max(ctx.last_scale_up_time, ctx.last_scale_down_time, registered_at)`. The first two
  are set by the controller (time.time()) whenever it actually changed the deployment's target count,
  including Serve's own scale-from-zero; `registered_at` (first tick after the deployment was registered)
  stands for dstack's "replicas were submitted" when the service is (re)deployed.
- Scale from zero: Serve's wrapper returns `max(1, target)` at once, without calling the policy, whenever
  there are 0 running replicas and requests are ongoing or queued at a handle/proxy
  (`ctx.total_num_requests > 0`). The policy does the same itself (never returns 0 while
  `ctx.total_num_requests > 0`, or while a running replica reports engine-path requests in flight,
  METRIC_ENGINE_IN_FLIGHT, which Serve does not count), and dstack's "from 0 at once" holds for a positive
  RPS too.

Serve's own delays and the values the plan must set
----------------------------------------------------
Custom policies do NOT bypass Serve's post-processing in 2.60: `_apply_autoscaling_config` wraps the policy
and applies `upscaling_factor`/`downscaling_factor`, then `upscale_delay_s` / `downscale_delay_s` /
`downscale_to_zero_delay_s`, then min/max. Serve's delays mean "the policy must have asked for the same
direction continuously for N seconds" — not dstack's "N seconds since the last scaling event" — so they
would add to ours. Set them to 0 and let this policy apply dstack's delays:

    autoscaling_config = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "downscale_to_zero_delay_s": 0,
        "metrics_interval_s": 1.0,     # replica push period: RPS lag and the loss window when a replica stops
        "look_back_period_s": 5.0,     # must exceed metrics_interval_s; only Serve's ongoing-request average
                                       # (scale-from-zero / in-flight guard) and the replica's series length
        # upscaling_factor / downscaling_factor: leave unset (1.0); anything else distorts ceil(rps/target)
        "policy": {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": policy_kwargs(scaling)},
    }

(`metrics_interval_s` != 10 emits a DeprecationWarning in 2.60; it still works.) The deployment itself must
define `record_autoscaling_stats()` returning `RequestCounter.stats()`; without it the policy sees 0 RPS.

One Serve constraint remains: Serve never goes N → 0 in one step from N > 1 (it clamps to 1 first); the policy
then lets the 1 → 0 step through on the next tick without waiting another `scale_down_delay`.

The policy runs inside Serve's controller and keeps its measurement in `policy_state` only; the RPS that
`ray-dstack status` shows comes from each replica's own gauge (`serve/metrics.py`, `record_replica_rps`).

`schedule` and `max_duration` (policy_kwargs `lifetime`)
-------------------------------------------------------
dstack: a service with `schedule` is created with no replicas and starts at the next cron time (UTC,
day-of-week 0 = Monday) after it was submitted; the schedule never stops it. `max_duration` stops it that long
after it started; with a schedule it then waits for the next cron time after the stop and starts again.
`lifetime = {"deployed_at": unix s, "crons": [...], "max_duration_s": s | None}` says all of it, so
`active_window(lifetime, now)` is a pure function of the time (no state to lose on a controller restart).
Outside a window the policy answers 0; inside it the usual answer: `fixed_replicas` (a service without
`scaling`) or dstack's RPS rule floored at `min_replicas` (Serve's own minimum is 0 so that 0 can happen).

Outside a window a request can still start one replica: Serve's wrapper (`_apply_autoscaling_config`,
`_get_cold_start_scale_up_replicas`) returns `max(1, target)` without calling the policy whenever 0 replicas
run and requests wait at a proxy or handle (`total_num_requests > 0`). Once that replica runs, the wrapper calls
the policy again, which answers 0, and Serve stops it at once (`downscale_to_zero_delay_s: 0`); the request it
was started for may or may not be served by then. The policy cannot prevent the start: the replica itself
would have to refuse to run its commands outside a window.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ray.serve.config import AutoscalingContext

POLICY_IMPORT_PATH = "ray_dstack.serve.scaling.autoscaling_policy:rps_policy"

# Metric names returned by RequestCounter.stats() (ray_dstack/serve/scaling/request_counter.py keeps a copy).
METRIC_REQUESTS_TOTAL = "ray_dstack_requests_total"
METRIC_REQUESTS_IN_WINDOW = "ray_dstack_requests_in_window"
METRIC_WINDOW_S = "ray_dstack_window_s"
# Requests HAProxy is sending to (or queueing for) a replica's engine on the engine path, which Serve's
# `total_num_requests` never sees: the scale-to-zero guard counts them too.
METRIC_ENGINE_IN_FLIGHT = "ray_dstack_engine_in_flight"

STATE_KEY = "ray_dstack"
# How long the policy remembers the last counter value of a replica that stopped reporting.
_FORGET_AFTER_S = 120.0
# ceil() of a ratio computed in floating point: 0.3 / 0.1 is 2.9999999999999996 and 0.7 / 0.1 7.000000000000001.
_EPS = 1e-9


def desired_replicas(
    rps: float,
    current: int,
    *,
    target: float,
    min_replicas: int,
    max_replicas: int,
    now: float,
    last_scale_time: float | None,
    scale_up_delay_s: float,
    scale_down_delay_s: float,
) -> int:
    """dstack's RPSAutoscaler: the desired replica count given the measured RPS and the current desired count.

    `last_scale_time` is the time of the last scaling event (None: none yet, no delay applies); `now` and it
    share one clock.
    """
    new = math.ceil(rps / target - _EPS) if rps > 0 else 0
    new = min(max(new, min_replicas), max_replicas)
    if new > current:
        if current == 0:
            return new  # no replicas: scale up at once
        if last_scale_time is not None and now - last_scale_time < scale_up_delay_s:
            return current
        return new
    if new < current:
        if last_scale_time is not None and now - last_scale_time < scale_down_delay_s:
            return current
        return new
    return new


def policy_kwargs(
    target_rps: float, window_s: float = 60.0, scale_up_delay_s: float = 300.0, scale_down_delay_s: float = 600.0
) -> dict[str, float]:
    """The `policy_kwargs` for `autoscaling_config.policy` (JSON-serialisable, as Serve requires)."""
    return {
        "target_rps": float(target_rps),
        "window_s": float(window_s),
        "scale_up_delay_s": float(scale_up_delay_s),
        "scale_down_delay_s": float(scale_down_delay_s),
    }


def _replica_key(replica_id: Any) -> str:
    to_str = getattr(replica_id, "to_full_id_str", None)
    return to_str() if callable(to_str) else str(replica_id)


def _last_value(series: Any) -> float | None:
    if not series:
        return None
    point = series[-1]
    return float(getattr(point, "value", point))


def _window_frames(frames: dict, now: float, window_s: float) -> dict[int, float]:
    """The frames (second → requests) inside the window ending at `now` (current second included)."""
    n = max(1, math.ceil(window_s))
    second = math.floor(now)
    return {int(s): c for s, c in frames.items() if second - n < int(s) <= second}


COUNTERS_READ_S = 1.0
# A counter not republished for this long belongs to an ingress replica that is gone (killed outright: nothing
# deleted its key); its last window must not seed a policy that lost its state. Generous: nodes' clocks differ.
COUNTER_STALE_S = 30.0


def service_counters(prefix: str, namespace: str, *, now: float | None = None
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The request counters the service's ingress replicas publish in Ray's internal KV (ray_dstack/serve/
    scaling/service_counters.py): `{key: {"total": n, "in_window": m}}` as one-point series per replica.
    A group behind a router (or beside the ingress group) takes no request from Serve: it scales on these."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    totals: dict[str, list[float]] = {}
    in_window: dict[str, list[float]] = {}
    for key in _internal_kv_list(prefix, namespace=namespace):
        raw = _internal_kv_get(key, namespace=namespace)
        try:
            data = json.loads(raw) if raw is not None else None
            name = key.decode() if isinstance(key, bytes) else str(key)
            stale = (now if now is not None else time.time()) - float(data.get("time", 0.0)) > COUNTER_STALE_S
            totals[name] = [float(data["total"])]
            in_window[name] = [0.0 if stale else float(data.get("in_window", 0.0))]
        except (ValueError, TypeError, KeyError):
            continue
    return totals, in_window


def _measure(ctx: AutoscalingContext, state: dict[str, Any], *, window_s: float, now: float,
             counters: tuple[dict, dict] | None = None) -> float:
    """Fold the replicas' counters (Serve's metrics of this deployment's replicas, or `counters`) into
    `state["frames"]`; return the RPS over the window."""
    raw = ctx.raw_metrics or {}
    totals = raw.get(METRIC_REQUESTS_TOTAL) or {}
    in_window = raw.get(METRIC_REQUESTS_IN_WINDOW) or {}
    if counters is not None:
        totals, in_window = counters
    bootstrap = "seen" not in state
    frames = _window_frames(state.get("frames") or {}, now, window_s)
    seen: dict[str, list[float]] = {k: list(v) for k, v in (state.get("seen") or {}).items()}

    new_requests = 0.0
    seed = 0.0
    for replica_id, series in totals.items():
        total = _last_value(series)
        if total is None:
            continue
        key = _replica_key(replica_id)
        previous = seen.get(key)
        if previous is not None:
            # A counter never decreases; if it did, the replica restarted its count: all of it is new.
            new_requests += total - previous[0] if total >= previous[0] else total
        elif bootstrap:
            # Our frames were lost (redeploy, controller restart): the replica's own window stands in.
            seed += _last_value(in_window.get(replica_id)) or 0.0
        else:
            new_requests += total  # a replica reporting for the first time: everything since it started
        seen[key] = [total, now]

    running = {_replica_key(r) for r in (getattr(ctx, "running_replicas", None) or [])}
    if counters is not None:
        running = set(totals)
    seen = {k: v for k, v in seen.items() if k in running or now - v[1] <= _FORGET_AFTER_S}

    second = math.floor(now)
    if new_requests > 0:
        frames[second] = frames.get(second, 0.0) + new_requests
    if seed > 0:  # spread evenly over the window: the best guess without the replicas' frames
        n = max(1, math.ceil(window_s))
        for s in range(second - n + 1, second + 1):
            frames[s] = frames.get(s, 0.0) + seed / n
    state["frames"] = frames
    state["seen"] = seen
    return sum(frames.values()) / window_s


def current_rps(ctx: AutoscalingContext) -> float | None:
    """The service's RPS as last measured by the policy (None before its first tick)."""
    state = (getattr(ctx, "policy_state", None) or {}).get(STATE_KEY)
    if not state or "window_s" not in state:
        return None
    now = ctx.current_time if ctx.current_time is not None else time.time()
    frames = _window_frames(state.get("frames") or {}, now, state["window_s"])
    return sum(frames.values()) / state["window_s"]


def _in_flight(ctx: AutoscalingContext) -> float:
    """Requests running or queued: Serve's count, plus the engine path's of the running replicas."""
    try:
        serve_count = float(ctx.total_num_requests or 0.0)
    except Exception:  # noqa: BLE001 - a metrics hiccup must not stop autoscaling
        serve_count = 0.0
    try:
        running = {_replica_key(r) for r in (getattr(ctx, "running_replicas", None) or [])}
        engine = (ctx.raw_metrics or {}).get(METRIC_ENGINE_IN_FLIGHT) or {}
        engine_count = sum(_last_value(series) or 0.0 for replica, series in engine.items()
                           if _replica_key(replica) in running)
    except Exception:  # noqa: BLE001 - as above
        engine_count = 0.0
    return serve_count + engine_count


def evaluate(
    ctx: AutoscalingContext,
    *,
    target_rps: float = 1.0,
    window_s: float = 60.0,
    scale_up_delay_s: float = 300.0,
    scale_down_delay_s: float = 600.0,
    counters: tuple[dict, dict] | None = None,
    lifetime: dict[str, Any] | Lifetime | None = None,
    fixed_replicas: int | None = None,
    min_replicas: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """One autoscaling tick: `(desired replicas, new policy_state)` from a Serve `AutoscalingContext`.
    `counters`: the service-wide counters (service_counters()) for a group that takes no request from Serve.
    `lifetime`: 0 outside the service's windows (`schedule`, `max_duration`); inside, `fixed_replicas` if given,
    else the RPS rule with at least `min_replicas` (the service's own minimum: Serve's is 0 then)."""
    policy_state = dict(ctx.policy_state or {})
    state = dict(policy_state.get(STATE_KEY) or {})
    now = ctx.current_time if ctx.current_time is not None else time.time()
    state.setdefault("registered_at", now)
    state["window_s"] = window_s
    active, next_change = True, None
    if lifetime is not None:
        clock = lifetime if isinstance(lifetime, Lifetime) else Lifetime(lifetime, now=state["registered_at"])
        active, next_change = clock.active(now)
        state["lifetime"] = {"active": active, "next_change": next_change}
    if fixed_replicas is not None:
        desired = int(fixed_replicas) if active else 0
        state.update(desired=desired, target_num_replicas=int(ctx.target_num_replicas))
        policy_state[STATE_KEY] = state
        return desired, policy_state

    rps = _measure(ctx, state, window_s=window_s, now=now, counters=counters)
    current = int(ctx.target_num_replicas)
    min_replicas = max(int(ctx.capacity_adjusted_min_replicas), int(min_replicas or 0))
    max_replicas = int(ctx.capacity_adjusted_max_replicas)
    min_replicas = min(min_replicas, max_replicas)
    events = [t for t in (state["registered_at"], ctx.last_scale_up_time, ctx.last_scale_down_time) if t is not None]
    last_scale_time = max(events) if events else None
    common = dict(target=target_rps, min_replicas=min_replicas, max_replicas=max_replicas, now=now)
    delays = dict(scale_up_delay_s=scale_up_delay_s, scale_down_delay_s=scale_down_delay_s)

    desired = desired_replicas(rps, current, last_scale_time=last_scale_time, **common, **delays)
    # Serve turns N → 0 (N > 1) into N → 1; finish the step to 0 on the next tick without a second delay.
    if (
        current == 1
        and desired == 1
        and state.get("to_zero")
        and desired_replicas(rps, current, last_scale_time=None, **common, **delays) == 0
    ):
        desired = 0
    state["to_zero"] = desired == 0 and current > 1
    # Never drop to zero while requests are running or queued (a cold start must serve its first request);
    # from zero with requests waiting, wake up at once (Serve's wrapper usually already did).
    if desired == 0 and _in_flight(ctx) > 0:
        desired = min(max(1, min_replicas), max_replicas)
    if not active:  # outside the windows nothing runs, requests waiting or not
        desired = 0

    state.update(rps=rps, desired=desired, target_num_replicas=current)
    policy_state[STATE_KEY] = state
    return desired, policy_state


# --- schedule and max_duration -------------------------------------------------------------------------------


def _triggers(crons: list[str]) -> list[Any]:
    from apscheduler.triggers.cron import CronTrigger

    return [CronTrigger.from_crontab(c, timezone="UTC") for c in crons]


def _fire_after(triggers: list[Any], after: float) -> float | None:
    from datetime import datetime, timedelta, timezone

    now = datetime.fromtimestamp(after, tz=timezone.utc) + timedelta(microseconds=1)  # strictly after
    times = [t for t in (trigger.get_next_fire_time(None, now) for trigger in triggers) if t is not None]
    return min(times).timestamp() if times else None


def next_fire(crons: list[str], after: float) -> float | None:
    """The earliest fire time of `crons` (UTC) strictly after `after` (unix s): config/models/schedule.py's
    `next_start` on floats (this module may not import it)."""
    return _fire_after(_triggers(crons), after)


def lifetime_window(lifetime: dict[str, Any], now: float, *, resume: float | None = None
                    ) -> tuple[float | None, float | None, float | None]:
    """`(start, end, next_start)` of the service's latest window that started at or before `now`: `start` None
    before the first one; `end` None when `max_duration` is unlimited; `next_start` the next cron time after
    `end` (before the first window: the first start). `resume`: a window start known from an earlier call,
    to replay the windows from there instead of from `deployed_at` (each costs a cron evaluation, ~25 µs:
    a year of hourly windows ~0.2 s, once per policy instance)."""
    deployed = lifetime.get("deployed_at")
    deployed = now if deployed is None else float(deployed)
    crons = list(lifetime.get("crons") or [])
    duration = lifetime.get("max_duration_s")
    duration = float(duration) if duration else None
    if not crons:  # started by the deploy (a deploying clock a little ahead does not delay it)
        start = min(deployed, now)
        return start, (deployed + duration if duration else None), None
    triggers = _triggers(crons)
    start = resume if resume is not None else _fire_after(triggers, deployed)
    if start is None or now < start:
        return None, None, start
    while duration is not None:
        end = start + duration
        following = _fire_after(triggers, end)
        if following is None or following > now:
            return start, end, following
        start = following
    return start, None, None


def active_window(lifetime: dict[str, Any], now: float) -> tuple[bool, float | None]:
    """`(active, next_change)`: whether the service runs at `now`, and when that changes (None: never)."""
    start, end, following = lifetime_window(lifetime, now)
    active = start is not None and (end is None or now < end)
    return active, (end if active else following)


class Lifetime:
    """`active_window` for one policy instance: computed again only when its answer changes, each time resuming
    from the window found last (Serve asks every ~0.1 s). `deployed_at` None: since this object was made."""

    def __init__(self, lifetime: dict[str, Any], now: float | None = None) -> None:
        self.lifetime = dict(lifetime)
        if self.lifetime.get("deployed_at") is None:
            self.lifetime["deployed_at"] = time.time() if now is None else now
        self._start: float | None = None
        self._answer: tuple[bool, float | None] | None = None

    def active(self, now: float) -> tuple[bool, float | None]:
        if self._answer is not None and (self._answer[1] is None or now < self._answer[1]):
            return self._answer
        start, end, following = lifetime_window(self.lifetime, now, resume=self._start)
        self._start = start
        active = start is not None and (end is None or now < end)
        self._answer = (active, end if active else following)
        return self._answer


class RpsPolicy:
    """The Serve policy object: Serve 2.60 instantiates it once with `policy_kwargs`, then calls it per tick."""

    def __init__(
        self,
        target_rps: float | None = None,
        window_s: float = 60.0,
        scale_up_delay_s: float = 300.0,
        scale_down_delay_s: float = 600.0,
        service_counters_prefix: str | None = None,
        kv_namespace: str | None = None,
        lifetime: dict[str, Any] | None = None,
        fixed_replicas: int | None = None,
        min_replicas: int | None = None,
    ) -> None:
        """`service_counters_prefix`/`kv_namespace`: scale on the service's request rate as its ingress replicas
        publish it (a replica group behind a router: dstack scales every group on the service's RPS).
        `lifetime`, `fixed_replicas`, `min_replicas`: see evaluate()."""
        if fixed_replicas is not None:
            if int(fixed_replicas) < 0:
                raise ValueError(f"fixed_replicas must be >= 0, got {fixed_replicas!r}")
            target_rps = 1.0 if target_rps is None else target_rps  # unused: no RPS rule
        if target_rps is None or not target_rps > 0:
            raise ValueError(f"target_rps must be > 0, got {target_rps!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        if scale_up_delay_s < 0 or scale_down_delay_s < 0:
            raise ValueError("scale delays must be >= 0")
        self.target_rps = float(target_rps)
        self.window_s = float(window_s)
        self.scale_up_delay_s = float(scale_up_delay_s)
        self.scale_down_delay_s = float(scale_down_delay_s)
        self.service_counters_prefix = service_counters_prefix
        self.kv_namespace = kv_namespace
        self.lifetime = Lifetime(lifetime) if lifetime is not None else None
        self.fixed_replicas = None if fixed_replicas is None else int(fixed_replicas)
        self.min_replicas = None if min_replicas is None else int(min_replicas)
        self._counters: tuple[float, tuple[dict, dict]] | None = None  # (when read, counters)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        counters = None
        if self.service_counters_prefix is not None and self.fixed_replicas is None:
            # Serve calls this on its controller's loop every ~0.1 s: read the GCS at most once per
            # COUNTERS_READ_S (the ingress replicas publish once a second anyway).
            now = time.monotonic()
            if self._counters is None or now - self._counters[0] >= COUNTERS_READ_S:
                try:
                    self._counters = (now, service_counters(self.service_counters_prefix, self.kv_namespace or ""))
                except Exception:  # noqa: BLE001 - the GCS briefly away: keep the current count this tick
                    state = dict(ctx.policy_state or {})
                    return int(ctx.target_num_replicas), state
            counters = self._counters[1]
        return evaluate(
            ctx,
            target_rps=self.target_rps,
            window_s=self.window_s,
            scale_up_delay_s=self.scale_up_delay_s,
            scale_down_delay_s=self.scale_down_delay_s,
            counters=counters,
            lifetime=self.lifetime,
            fixed_replicas=self.fixed_replicas,
            min_replicas=self.min_replicas,
        )


# The import path the plan references (`POLICY_IMPORT_PATH`); a class, so that Serve passes `policy_kwargs`.
rps_policy = RpsPolicy
