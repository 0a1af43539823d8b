"""Serve application builders, referenced by `import_path` in the Serve config that `ray-dstack plan` prints.

Serve calls a builder with the application's `args`; deployment options (resources, replicas, autoscaling)
come from the `deployments:` section of the same config, so the builders only bind code to arguments.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from ray_dstack.spec import GATEWAY_DEPLOYMENT_NAME, REPLICA_DEPLOYMENT_NAME


def build_service(args: dict[str, Any]) -> Application:
    """One deployment per replica group: the group that takes the service's traffic (REPLICA_DEPLOYMENT_NAME)
    is the application's ingress, the others (`args["groups"]`) are bound to it so that Serve deploys them
    with the application; they are reached through the router (or the ingress group), never through Serve's
    HTTP proxy."""
    from ray_dstack.serve.replica import ServiceReplica

    created = args.get("created")
    deployment = serve.deployment(name=REPLICA_DEPLOYMENT_NAME)(ServiceReplica)
    if "service" in args:
        return deployment.bind(args["service"], created=created)
    # Groups: each replica reads its group's spec from its deployment's options (ray_dstack.spec.SPEC_ENV_VAR).
    env = args.get("env") or {}
    members = {
        group["deployment"]: serve.deployment(name=group["deployment"])(ServiceReplica).bind(
            None, created=created, env=env)
        for group in args["groups"] if group["deployment"] != REPLICA_DEPLOYMENT_NAME
    }
    return deployment.bind(None, created=created, members=members, env=env)


def build_gateway(args: dict[str, Any]) -> Application:
    from ray_dstack.serve.ingress.gateway import OpenAIGateway

    deployment = serve.deployment(name=GATEWAY_DEPLOYMENT_NAME)(OpenAIGateway)
    return deployment.bind()
