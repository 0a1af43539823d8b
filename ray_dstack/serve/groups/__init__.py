"""Replica groups inside Ray (dstack 0.21's `groups`): which replicas are ready to serve, and the router's side.

- registry.py: every replica of a group that is reached through a router announces itself in Ray's internal KV
  while it is ready (a heartbeat); the router's replica reads the announcements.
- sglang_sync.py: the router replica owns its SGLang router's worker list (`POST`/`DELETE /workers`).
- dynamo.py: a Dynamo router replica publishes its node's address; its workers wait for it.
"""
