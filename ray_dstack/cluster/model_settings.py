"""Deploy-time resolution of a `tgi` model's chat template and special tokens.

Done by the deploying command, not the replicas, so a wrong model name or a gated model without a token
fails the deploy with a clear message instead of the first request.
"""

from __future__ import annotations

from typing import Any


def resolve_model_settings(service: dict[str, Any]) -> dict[str, Any]:
    model = service.get("model")
    if not model or model.get("format") != "tgi":
        return service
    from ray_dstack.gateway.hub import resolve_chat_settings

    settings = resolve_chat_settings(
        model["name"],
        chat_template=model.get("chat_template"),
        eos_token=model.get("eos_token"),
        env=service.get("env") or {},
    )
    model = {
        **model,
        "chat_template": settings.chat_template,
        "eos_token": settings.eos_token,
        "bos_token": model.get("bos_token") or settings.bos_token,
    }
    return {**service, "model": model}
