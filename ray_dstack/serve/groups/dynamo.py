"""A Dynamo router group (spec §1.7): dstack does not sync workers (Dynamo's frontend discovers them through
the etcd/NATS the user starts on the router replica); it gives every worker `DSTACK_ROUTER_INTERNAL_IP`, the
router replica's address, and holds a worker back until the router has one (30 minutes at most, then the
worker fails). The router replica runs in its node's network (the plan gives it no namespace), so the ports
it opens are reachable at that address from every node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from ray_dstack.serve.groups.registry import KV

ROUTER_KEY_PREFIX = "router/"
WAIT_S = 30 * 60.0
POLL_S = 1.0


def router_key(service: str) -> str:
    return f"{ROUTER_KEY_PREFIX}{service}"


async def publish_router(kv: KV, service: str, *, node_ip: str, replica: str) -> None:
    value = json.dumps({"node_ip": node_ip, "replica": replica}).encode()
    await asyncio.to_thread(kv.put, router_key(service), value)


async def withdraw_router(kv: KV, service: str, *, replica: str) -> None:
    """Remove the router's address if it is still this replica's (a newer router may have replaced it)."""
    raw = await asyncio.to_thread(kv.get, router_key(service))
    try:
        if raw is not None and json.loads(raw).get("replica") == replica:
            await asyncio.to_thread(kv.delete, router_key(service))
    except ValueError:
        pass


async def wait_for_router(kv: KV, service: str, logger: logging.Logger, *, timeout_s: float = WAIT_S) -> str:
    """The router replica's address, once it has one; raise TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        raw = await asyncio.to_thread(kv.get, router_key(service))
        if raw is not None:
            try:
                return str(json.loads(raw)["node_ip"])
            except (ValueError, KeyError, TypeError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Dynamo router of service {service!r} had no address after {timeout_s:.0f}s")
        if not said:
            logger.info("waiting for the Dynamo router replica's address ($DSTACK_ROUTER_INTERNAL_IP)")
            said = True
        await asyncio.sleep(POLL_S)
