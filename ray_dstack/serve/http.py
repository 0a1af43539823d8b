"""`GatewayResponse` (the protocol layer's answer) → Starlette response, for the replica and the gateway."""

from __future__ import annotations

from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from ray_dstack.openai.endpoint import GatewayResponse


def to_starlette(resp: GatewayResponse) -> Response:
    """The one place a `GatewayResponse` becomes a Starlette response."""
    headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-type"}
    if resp.is_stream:
        closer = getattr(resp.body, "aclose", None)
        return StreamingResponse(
            resp.body, status_code=resp.status, headers=headers, media_type=resp.headers.get("content-type"),
            background=BackgroundTask(closer) if closer is not None else None,
        )
    return Response(resp.body, status_code=resp.status, headers=headers, media_type=resp.headers.get("content-type"))
