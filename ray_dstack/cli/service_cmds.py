"""`deploy`, `status`, `list`, `logs`, `delete`: services on a Ray cluster, through its dashboard API (`status`,
`list` and `logs` live in status_cmds.py)."""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ray_dstack.cli import output, status_cmds
from ray_dstack.cli.plan_cmd import add_upload_limit, parse_env_args
from ray_dstack.cli.status_cmds import probe_line, replicas_text
from ray_dstack.deploy import apps
from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.deploy.local import connect
from ray_dstack.deploy.model_settings import resolve_model_settings
from ray_dstack.deploy.rollout import wait_for_service
from ray_dstack.deploy.router_state import add_router_states
from ray_dstack.deploy.uploads import format_size, pack_uploads, upload_limit
from ray_dstack.errors import RayDstackError, UsageError
from ray_dstack.spec import GATEWAY_ROUTE_PREFIX, token_digest

TOKEN_ENV = "RAY_DSTACK_TOKEN"
DEFAULT_DEPLOY_TIMEOUT_S = 900.0
TRUSTED_PROXIES_ENV = "RAY_DSTACK_TRUSTED_PROXIES"


def token_dir() -> Path:
    return Path(os.environ.get("RAY_DSTACK_HOME", Path.home() / ".ray-dstack")) / "tokens"


def save_token(name: str, token: str) -> Path:
    directory = token_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / f"{name}.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


def saved_token(name: str) -> str | None:
    try:
        return (token_dir() / f"{name}.token").read_text().strip() or None
    except OSError:
        return None


def resolve_token(cli_token: str | None, existing_app: dict[str, Any] | None) -> tuple[str | None, str, bool]:
    """(token if known in clear, its digest, generated now?). A redeploy without a token keeps the old one."""
    token = cli_token or os.environ.get(TOKEN_ENV)
    if token:
        return token, token_digest(token), False
    if apps.is_service(existing_app):
        digest = apps.service_spec(existing_app).auth.token_sha256
        if digest:
            return None, digest, False
    token = secrets.token_urlsafe(24)
    return token, token_digest(token), True


# --- deploy -------------------------------------------------------------------------------------------


def trusted_proxies(args: argparse.Namespace) -> list[str]:
    from ray_dstack.serve.ingress.rate_limit import parse_trusted_proxies

    text = args.trusted_proxies if args.trusted_proxies is not None else os.environ.get(TRUSTED_PROXIES_ENV, "")
    try:
        return parse_trusted_proxies(text)
    except ValueError as exc:
        raise UsageError(f"--trusted-proxies: {exc}") from None


def cmd_deploy(args: argparse.Namespace) -> int:
    from ray_dstack.config import load_service
    from ray_dstack.plan import build_plan
    from ray_dstack.serve.runtime import netns
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise UsageError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout:g}")
    if args.drain_timeout is not None and not args.drain_timeout >= 0:
        raise UsageError(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout:g}")
    loaded = load_service(args.file, env_overrides=parse_env_args(args.env), name=args.name)
    # `files` and a local `repos` entry, packed before anything reaches the cluster (missing or too big: exit 2).
    packed = pack_uploads(loaded, upload_limit(args.upload_limit))
    # Plan before touching the cluster: a config the plan rejects never reaches it.
    # Namespaces per replica as this machine sees them (pasta on PATH, or $RAY_DSTACK_NETWORK_NAMESPACES): a
    # node without pasta then fails its replica with what to install, never two replicas on one port.
    plan = build_plan(loaded, token_sha256=None, network_namespaces=netns.available())
    for warning in plan.warnings:
        output.warn(warning)
    name = plan.name

    client, started = connect(
        args.address,
        start_if_missing=True,
        on_start=lambda: output.err.print("No Ray cluster found: starting a local Ray head (`ray stop` ends it)"),
    )
    with client:
        details = client.serve_details()
        apps.check_can_write(details, name)
        existing = apps.app_configs(details).get(name)
        # dstack's redeploy rule: the router group does not change in place (refused before anything changes).
        apps.check_router_unchanged(name, existing, [g.spec for g in plan.groups])
        token, digest, generated = (None, None, False)
        if loaded.config.auth:
            token, digest, generated = resolve_token(args.token, existing)
        store, auth_key = hand_over_registry_auth(client.address, name, loaded.config, plan.registry_auth)
        packages, previous_uploads = hand_over_uploads(client, name, packed, existing)
        plan = plan.finalized(
            uploads=[p.spec for p in packed],  # by reference: each replica unpacks them from Ray's package store
            registry_auth_key=auth_key,
            token_sha256=digest,
            created=apps.created_time(existing) or int(time.time()),
            deployed_at=apps.lifetime_start(existing, time.time()),  # `schedule`/`max_duration` count from it
            request_timeout_s=args.request_timeout,  # upstream read timeout of the replicas (504 past it)
            drain_timeout_s=args.drain_timeout,  # how long a replica being removed finishes its requests
            # A probe that never passes fails the replica (with its last answer) before `--timeout` runs out.
            ready_timeout_s=None if args.detach else max(10.0, args.timeout - 5.0),
            trusted_proxies=trusted_proxies(args),  # whose X-Forwarded-For `rate_limits` believe
            model_settings=resolve_model_settings(plan.spec.model, plan.spec.env),
        )
        app_cfg = plan.application()
        new_config = apps.merged_config(details, put=app_cfg, http_options=http_options(args, started))
        previous_time = ((details.get("applications") or {}).get(name) or {}).get("last_deployed_time_s")

        output.err.print(f"Deploying {name} to {client.address} ...")
        pulls = watch_pulls(client.address, name) if plan.pulls_images and not args.detach else None
        client.put_applications(new_config)
        if args.detach:
            # The record keeps both versions' packages: if the new one never comes up, Serve keeps the running
            # replicas, and a restart of one still finds its files. The next deploy or `delete` collects them.
            output.out.print(f"Submitted {name}; watch it with `ray-dstack status {name}`")
            return 0
        try:
            result = wait_for_service(
                client,
                name,
                timeout_s=args.timeout,
                on_progress=lambda line: output.err.print(f"  {line}", markup=False),
                previous_deployed_time=previous_time,
                deployments=app_cfg["deployments"],  # every replica group's: some node must host each
                # Where an autoscaler may still add a node that fits, wait the whole timeout.
                fail_if_unplaceable=client.is_fixed_size(),
                more_progress=pulls.lines if pulls else None,  # the image pull's progress per node
            )
        finally:
            if pulls:
                pulls.clear()
        if not result.ok:
            rollback(client, name, existing)
            if store is not None:  # the previous version (if any) keeps its own entry
                store.delete(auth_key)
            finish_uploads(packages, name, packed, previous_uploads, ok=False)
            raise RayDstackError(
                f"service {name!r} did not become ready: {result.reason}\n"
                + ("The previous version keeps serving." if existing else "Nothing was left deployed.")
            )
        if store is not None:  # older versions' credentials: no replica of them is left
            store.forget(name, keep=auth_key)
        finish_uploads(packages, name, packed, previous_uploads, ok=True)
        details = client.serve_details()
        summary = apps.service_summary(name, details["applications"][name], apps.http_base_url(details, client.address))
        add_router_states(client, summary)  # what the router group lists by now
    if token and (generated or args.token or os.environ.get(TOKEN_ENV)):
        save_token(name, token)
    print_ready(summary, token if generated else None, auth=bool(summary.get("auth")))
    return 0


def hand_over_registry_auth(address: str, name: str, config, ref) -> tuple[Any, str | None]:
    """`registry_auth` goes to the replicas through Ray's internal KV under a fresh key, never through the
    Serve config (ray_dstack/deploy/registry_auth.py). Returns (store, key), or (None, None) without it."""
    if ref is None:
        return None, None
    from ray_dstack.deploy.registry_auth import CredentialStore, new_key

    store = CredentialStore(address)
    key = new_key(name)
    store.put(key, config.registry_auth.username, config.registry_auth.password.get_secret_value())
    return store, key


def hand_over_uploads(client: DashboardClient, name: str, packed: list, existing: dict[str, Any] | None
                      ) -> tuple[Any, list[str]]:
    """Upload what `files`/`repos` packed (what the cluster lacks) and record it for the service
    (ray_dstack/deploy/package_store.py). Returns (store, the running version's URIs), or (None, []) when neither
    version has uploads. Without new uploads an unreachable GCS only means the old packages stay: a note."""
    had_uploads = any(spec.uploads for spec in _specs(existing))
    if not packed and not had_uploads:
        return None, []
    from ray_dstack.deploy.package_store import PackageStore

    try:
        packages = PackageStore(client)
    except RayDstackError as exc:
        if packed:
            raise
        output.err.print(f"  (the previous version's `files` stay in the cluster's GCS: {exc})", markup=False)
        return None, []
    previous = packages.begin(name, packed)
    for item in packed:
        output.err.print(f"  {item.spec.source} → {item.spec.path}: {format_size(item.spec.size)}, {item.spec.uri}",
                         markup=False)
    return packages, previous


def finish_uploads(packages, name: str, packed: list, previous: list[str], *, ok: bool) -> None:
    """The deploy's outcome for the package records: keep the new version's (ok) or the running version's."""
    if packages is None:
        return
    try:
        if ok:
            packages.commit(name, packed, previous)
        else:
            packages.abort(name, packed, previous)
    except Exception as exc:  # noqa: BLE001 - the deploy's outcome stands; the next deploy/delete cleans up
        output.err.print(f"  (cleaning up uploaded `files` failed: {type(exc).__name__}: {exc})", markup=False)


def _specs(app_config: dict[str, Any] | None) -> list:
    if not apps.is_service(app_config):
        return []
    return apps.group_specs(app_config) or [apps.service_spec(app_config)]


def watch_pulls(address: str, name: str):
    """The image pull's progress per node (ray_dstack/deploy/pull_watch.py), its stale entries cleared; None,
    with a note, where the cluster's GCS cannot be reached from here (the deploy goes on without it)."""
    from ray_dstack.deploy.pull_watch import PullWatch

    pulls, why_not = PullWatch.connect(address, name)
    if pulls is None:
        output.err.print(f"  (no image pull progress: {why_not})", markup=False)
        return None
    pulls.clear()
    return pulls


def http_options(args: argparse.Namespace, started_locally: bool) -> dict[str, Any]:
    host = args.http_host or ("127.0.0.1" if started_locally else "0.0.0.0")
    return {"host": host, "port": args.http_port}


def rollback(client: DashboardClient, name: str, existing: dict[str, Any] | None) -> None:
    details = client.serve_details()
    if existing is not None:
        client.put_applications(apps.merged_config(details, put=existing))
    else:
        client.put_applications(apps.merged_config(details, remove=name))


def print_ready(summary: dict[str, Any], new_token: str | None, *, auth: bool) -> None:
    name, url = summary["name"], summary["url"]
    con = output.out
    if summary.get("groups"):
        con.print(f"[green]Service {name} is ready[/green]: {replicas_text(summary)} replicas at {url}/")
        for group in summary["groups"]:
            if group.get("router") is not None:
                for line in status_cmds.router_lines(group["router"]):
                    con.print(f"  {line}", markup=False)
    else:
        con.print(f"[green]Service {name} is ready[/green]: {summary['replicas']['running']} replica(s) at {url}/")
    token_ref = "$RAY_DSTACK_TOKEN"
    if new_token:
        con.print(
            f"Token (shown once; saved to {token_dir() / (name + '.token')}):\n  {new_token}", markup=False
        )
        token_ref = new_token
    auth_header = f" -H 'Authorization: Bearer {token_ref}'" if auth else ""
    model = summary.get("model")
    if model:
        base = model["openai_base_url"]
        con.print("Call it with curl:", markup=False)
        con.print(
            f"  curl {base}/chat/completions{auth_header} -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model['name']}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
            markup=False,
        )
        con.print("or the OpenAI SDK:", markup=False)
        con.print(
            "  from openai import OpenAI\n"
            f"  client = OpenAI(base_url=\"{base}\", api_key=\"{token_ref if auth else 'none'}\")\n"
            f"  print(client.chat.completions.create(model=\"{model['name']}\", "
            "messages=[{\"role\": \"user\", \"content\": \"Hello!\"}]).choices[0].message.content)",
            markup=False,
        )
    else:
        con.print(f"Call it with:\n  curl {url}/{auth_header}", markup=False)


# --- delete -------------------------------------------------------------------------------------------


def cmd_delete(args: argparse.Namespace) -> int:
    client, _ = connect(args.address, start_if_missing=False)
    with client:
        details = client.serve_details()
        configs = apps.app_configs(details)
        if args.name not in configs:
            raise RayDstackError(f"no service named {args.name!r} on this cluster")
        if not apps.is_service(configs[args.name]):
            raise UsageError(f"{args.name!r} is a Serve application that ray-dstack did not deploy; not deleting it")
        apps.check_can_write(details, args.name)
        specs = apps.group_specs(configs[args.name]) or [apps.service_spec(configs[args.name])]
        client.put_applications(apps.merged_config(details, remove=args.name))
        if any(spec.registry_auth is not None for spec in specs):
            from ray_dstack.deploy.registry_auth import CredentialStore

            CredentialStore(client.address).forget(args.name)
        if any(spec.uploads for spec in specs):  # its packages, unless another service uses the same
            forget_uploads(client, args.name)
        if any(spec.image is not None for spec in specs):  # pull progress replicas started after the deploy left
            from ray_dstack.deploy.pull_watch import PullWatch

            pulls, _ = PullWatch.connect(client.address, args.name)
            if pulls:
                pulls.clear()
        deadline = time.monotonic() + args.timeout
        while args.name in (client.serve_details().get("applications") or {}):
            if time.monotonic() > deadline:
                raise RayDstackError(f"service {args.name!r} is still shutting down after {args.timeout:.0f}s")
            time.sleep(0.5)
    output.out.print(f"Deleted {args.name}")
    return 0


def forget_uploads(client: DashboardClient, name: str) -> None:
    from ray_dstack.deploy.package_store import PackageStore

    try:
        PackageStore(client).forget(name)
    except RayDstackError as exc:
        output.err.print(f"(the service's `files` stay in the cluster's GCS: {exc})", markup=False)


# --- registration -------------------------------------------------------------------------------------


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray dashboard address, e.g. http://<head>:8265 (default: $RAY_ADDRESS, else the local cluster)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deploy a service and wait until it is ready")
    p.add_argument("file", help="path to a .dstack.yml service configuration")
    _address(p)
    p.add_argument("--name", help="service name (default: the file's `name`, else derived from the file name)")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="set or fill an env variable (repeatable)")
    p.add_argument("--token", help=f"service token (default: ${TOKEN_ENV}, else kept or generated)")
    p.add_argument("--detach", action="store_true", help="return once submitted, without waiting")
    p.add_argument("--timeout", type=float, default=DEFAULT_DEPLOY_TIMEOUT_S, help="seconds to wait for readiness")
    p.add_argument(
        "--request-timeout", type=float, default=None, metavar="SECONDS",
        help="how long a replica waits for its backend to answer (or to send the next streamed chunk) "
        "before answering 504 (default: 600)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=None, metavar="SECONDS",
        help="how long a replica being removed (scale-down, redeploy, delete) takes no new requests and lets "
        "in-flight requests and streams finish before its process is stopped (default: 30)",
    )
    p.add_argument(
        "--trusted-proxies", default=None, metavar="ADDRS",
        help="comma-separated addresses/networks of the proxies in front of Serve whose X-Forwarded-For "
        f"names the client for `rate_limits` (default: ${TRUSTED_PROXIES_ENV}, else none: the peer address)",
    )
    p.add_argument("--http-port", type=int, default=apps.DEFAULT_HTTP_PORT, help="Serve HTTP port if Serve is not running yet")
    p.add_argument("--http-host", help="Serve HTTP host if Serve is not running yet")
    add_upload_limit(p)
    p.set_defaults(func=cmd_deploy)

    status_cmds.register_status(sub, _address)
    status_cmds.register_logs(sub, _address)

    p = sub.add_parser("delete", help="delete a service")
    p.add_argument("name")
    _address(p)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_delete)


__all__ = ["register", "GATEWAY_ROUTE_PREFIX", "probe_line"]
