"""`ray-dstack plan FILE` (the Serve config a file becomes) and `ray-dstack schema` (JSON Schema)."""

from __future__ import annotations

import argparse
import sys

import yaml

from ray_dstack.cli import output
from ray_dstack.errors import UsageError


def parse_env_args(pairs: list[str] | None) -> dict[str, str]:
    """`-e K=V` options → dict; `-e K` takes K from the caller's environment (like docker)."""
    import os

    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not key:
            raise UsageError(f"Invalid -e value `{pair}`: expected KEY=VALUE")
        if not sep:
            if key not in os.environ:
                raise UsageError(f"-e {key}: environment variable {key} is not set")
            value = os.environ[key]
        result[key] = value
    return result


def container_runtime() -> str:
    """Whose `run` command `plan` shows: what $RAY_DSTACK_CONTAINER_RUNTIME names here (docker, podman or a
    path to either), else podman. An unknown value is the nodes' error to report; here it shows podman's."""
    import os

    from ray_dstack.spec.container_command import RUNTIME_ENV, runtime_kind

    return runtime_kind(os.environ.get(RUNTIME_ENV) or "") or "podman"


def comment_block(lines: list[str]) -> str:
    """The summary above the YAML: every physical line a comment, so the output stays valid `serve deploy`
    input (a container's `-c` script spans several lines)."""
    return "".join(f"# {part}\n".replace("# \n", "#\n") for line in lines for part in (line.splitlines() or [""]))


def _plan(args: argparse.Namespace) -> int:
    from ray_dstack.config import load_service
    from ray_dstack.plan import build_plan
    from ray_dstack.serve.runtime import netns

    from ray_dstack.deploy.uploads import pack_uploads, upload_limit

    loaded = load_service(args.file, env_overrides=parse_env_args(args.env), name=args.name)
    # `files`/a local `repos` packed as `deploy` packs them (nothing uploaded): their URIs, sizes, the limit.
    packed = pack_uploads(loaded, upload_limit(args.upload_limit))
    plan = build_plan(loaded, network_namespaces=netns.available(), container_runtime=container_runtime())
    if packed:
        plan = plan.finalized(token_sha256=plan.spec.auth.token_sha256, uploads=[p.spec for p in packed])
    data = plan.to_display_dict()
    if args.json:
        output.print_json({"serve_config": data, "gpu_types": plan.gpu_types, "warnings": plan.warnings,
                           "requirements": plan.requirements, "environment": plan.environment(),
                           "uploads": [p.spec.model_dump(mode="json") for p in packed]})
        return 0
    sys.stdout.write(comment_block(plan.summary_lines()) + yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    sys.stdout.flush()
    return 0


def _schema(args: argparse.Namespace) -> int:
    from ray_dstack.config import ServiceConfig

    output.print_json(ServiceConfig.model_json_schema())
    return 0


def add_upload_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upload-limit", metavar="SIZE", default=None,
                   help="largest archive per `files`/`repos` entry: bytes or e.g. 10MiB, 0 = no limit "
                   "(default: $RAY_DSTACK_UPLOAD_LIMIT, else 2MiB as dstack)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="Show the Serve config a .dstack.yml becomes (nothing is deployed)")
    p.add_argument("file", help="A service configuration (*.dstack.yml)")
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE",
                   help="Set an env variable placeholder (repeatable)")
    p.add_argument("--name", help="Service name (default: `name` in the file, else the file name)")
    p.add_argument("--json", action="store_true", help="Print JSON instead of YAML")
    add_upload_limit(p)
    p.set_defaults(func=_plan)
    s = subparsers.add_parser("schema", help="Print the JSON Schema of the service configuration")
    s.set_defaults(func=_schema)
