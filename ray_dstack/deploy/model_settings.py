"""Deploy-time resolution of a `tgi` model's chat template and special tokens.

Done by the deploying command, not the replicas, so a wrong model name or a gated model without a token
fails the deploy with a clear message instead of the first request.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray_dstack.spec import ModelSettings, ModelSpec


def resolve_model_settings(model: ModelSpec | None, env: Mapping[str, str]) -> ModelSettings | None:
    """The chat settings a tgi model needs (None for no model or an openai-format one, which needs none)."""
    if model is None or model.format != "tgi":
        return None
    from ray_dstack.deploy.hub import resolve_chat_settings

    settings = resolve_chat_settings(
        model.name, chat_template=model.chat_template, eos_token=model.eos_token, env=dict(env))
    return ModelSettings(chat_template=settings.chat_template, eos_token=settings.eos_token,
                         bos_token=settings.bos_token)
