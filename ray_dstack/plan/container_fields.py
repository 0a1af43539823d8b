"""dstack's container and service fields → the replica spec and the Serve deployment (pure).

- `volumes` → `MountSpec`s: a node directory, or a named volume (a directory under the nodes' volume root);
- `repos` with `url` → a clone per replica; `files` and local `repos` are packed and uploaded by `deploy`
  (ray_dstack/deploy/uploads.py), which hands their `UploadSpec`s to `ServicePlan.finalized`;
- `shell`, `user`, `privileged`, `docker`, `dstack`, `strip_prefix` → the spec, honoured by the runtimes;
- `stop_duration` → Serve's `graceful_shutdown_timeout_s` (dstack's default 5m; `off`: no limit);
- `schedule` and `max_duration` → the deployment's autoscaling policy, which keeps the service at 0 replicas
  outside its windows (ray_dstack/serve/scaling/autoscaling_policy.py).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from ray_dstack import spec as rt
from ray_dstack.config import ServiceConfig
from ray_dstack.plan import defaults
from ray_dstack.config.models.schedule import next_start
from ray_dstack.config.models.container import OFF, SHELLS, VOLUME_NAME_VAR_RE, InstanceMount, VolumeMount

# `stop_duration: off` means no limit, which Serve cannot express: a year stands for it.
UNLIMITED_STOP_S = 365 * 24 * 3600.0
# A dstack service replica is one job on one node: its job number and node rank are 0.
VOLUME_NAME_VALUES = {"job_num": "0", "node_rank": "0"}


def volume_specs(config: ServiceConfig) -> list[rt.MountSpec]:
    mounts = []
    for volume in config.volumes:
        if isinstance(volume, InstanceMount):
            mounts.append(rt.MountSpec(kind="instance", instance_path=volume.instance_path, path=volume.path,
                                       optional=volume.optional))
        else:
            assert isinstance(volume, VolumeMount)
            names = [VOLUME_NAME_VAR_RE.sub(lambda m: VOLUME_NAME_VALUES[m.group(1)], n) for n in volume.names]
            mounts.append(rt.MountSpec(kind="volume", names=names, path=volume.path))
    return mounts


def git_repo_spec(config: ServiceConfig) -> Optional[rt.GitRepoSpec]:
    repo = config.repos[0] if config.repos else None
    if repo is None or repo.url is None:
        return None
    return rt.GitRepoSpec(url=repo.url, branch=repo.branch, hash=repo.hash, path=repo.path,
                          if_exists=repo.if_exists,
                          single_branch=True if config.single_branch is None else config.single_branch)


def spec_fields(config: ServiceConfig, *, privileged: bool, docker: bool) -> dict[str, Any]:
    """The container fields of a replica spec (`privileged`/`docker` as the group resolved them)."""
    max_duration = config.max_duration
    return {
        "volumes": volume_specs(config),
        "git_repo": git_repo_spec(config),
        "shell": SHELLS.get(config.shell, config.shell) if config.shell else None,
        "user": config.user,
        "privileged": privileged or docker,  # dstack: `docker: true` forces privileged
        "docker": docker,
        "dstack_api": config.dstack,
        "strip_prefix": config.strip_prefix,
        "max_duration_s": float(max_duration) if isinstance(max_duration, int) and max_duration > 0 else None,
        "schedule": list(schedule_crons(config)),
    }


def schedule_crons(config: ServiceConfig) -> list[str]:
    schedule = getattr(config, "schedule", None)
    return list(schedule.crons) if schedule is not None else []


def stop_timeout_s(config: ServiceConfig) -> float:
    """Serve's `graceful_shutdown_timeout_s`: how long a stopping replica may finish its requests."""
    if config.stop_duration == OFF:
        return UNLIMITED_STOP_S
    if config.stop_duration is None:
        return defaults.GRACEFUL_SHUTDOWN_TIMEOUT_S
    return float(config.stop_duration)


def lifetime(spec: rt.ServiceSpec, deployed_at: float | None) -> Optional[dict[str, Any]]:
    """The policy's `lifetime` kwargs: when the service runs (`schedule`, `max_duration`); None when always."""
    if not spec.schedule and spec.max_duration_s is None:
        return None
    return {"deployed_at": deployed_at, "crons": list(spec.schedule), "max_duration_s": spec.max_duration_s}


def lines(spec: rt.ServiceSpec) -> list[str]:
    """What `plan` shows of these fields for one replica spec."""
    out = []
    for mount in spec.volumes:
        if mount.kind == "instance":
            out.append(f"volume: node directory {mount.instance_path} at {mount.path}"
                       + (" (optional)" if mount.optional else "") + ", created if absent")
        else:
            names = " or ".join(mount.names)
            out.append(f"volume: {names} at {mount.path} = <volume root>/{mount.names[0]} on each node "
                       f"(${rt.VOLUME_ROOT_ENV} there, default {rt.DEFAULT_VOLUME_ROOT}: node-local unless "
                       "it is shared storage)")
    for upload in spec.uploads:
        what = "repo" if upload.repo else "file" if upload.is_file else "files"
        out.append(f"{what}: {upload.source} → {upload.path} ({_size(upload.size)}, {upload.uri} in Ray's "
                   "package store)")
    if spec.git_repo is not None:
        repo = spec.git_repo
        ref = f" branch {repo.branch}" if repo.branch else ""
        ref += f" at {repo.hash}" if repo.hash else ""
        out.append(f"repo: {_scrub_url(repo.url)}{ref} cloned by each replica into {repo.path} "
                   f"(if it exists: {repo.if_exists})")
    if spec.shell:
        out.append(f"shell: {spec.shell}")
    if spec.user:
        out.append(f"user: {spec.user}")
    if spec.docker:
        out.append("docker: the commands get a Docker daemon (the node's, or podman's API service per replica)")
    elif spec.privileged:
        out.append("privileged: " + ("the container runs privileged" if spec.image else
                                     "no effect: the commands run as processes of the node"))
    if spec.dstack_api:
        out.append("dstack: the commands get $RAY_DSTACK_ADDRESS and $RAY_API_SERVER_ADDRESS (the cluster's dashboard)")
    if not spec.strip_prefix:
        out.append(f"strip_prefix: false: the service sees /{spec.name}/... paths")
    if spec.schedule:
        start = next_start(list(spec.schedule), datetime.now(timezone.utc))
        when = start.strftime("%Y-%m-%d %H:%M UTC") if start else "never"
        out.append(f"schedule: {', '.join(spec.schedule)} (UTC): created with 0 replicas, starts at the next cron "
                   f"time after the first deploy (deployed now: {when}); the schedule never stops it")
    if spec.max_duration_s is not None:
        out.append(f"max_duration: {spec.max_duration_s:g}s, then 0 replicas"
                   + (" until the next scheduled start" if spec.schedule else ""))
    return out


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024**2:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024**2:.1f} MiB"


def _scrub_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
