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
    from ray_dstack.serve.replica import ServiceReplica

    deployment = serve.deployment(name=REPLICA_DEPLOYMENT_NAME)(ServiceReplica)
    return deployment.bind(args["service"], created=args.get("created"))


def build_gateway(args: dict[str, Any]) -> Application:
    from ray_dstack.serve.ingress.gateway import OpenAIGateway

    deployment = serve.deployment(name=GATEWAY_DEPLOYMENT_NAME)(OpenAIGateway)
    return deployment.bind()
