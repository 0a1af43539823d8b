"""`ray-dstack chat "prompt"`: one prompt to a deployed model through the `/v1` gateway, streamed to stdout."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ray_dstack.errors import RayDstackError, UsageError

TOKEN_ENV = "RAY_DSTACK_TOKEN"


def pick_model(summaries: list[dict[str, Any]], wanted: str | None) -> dict[str, Any]:
    """The summary of the service that publishes `wanted` (or the only model on the cluster)."""
    models = [s for s in summaries if s.get("model")]
    if not models:
        raise RayDstackError("no deployed service publishes a model (add `model:` to a service and deploy it)")
    if wanted is None:
        if len(models) > 1:
            names = ", ".join(sorted(s["model"]["name"] for s in models))
            raise UsageError(f"several models are deployed ({names}): pick one with --model")
        return models[0]
    for s in models:
        if s["model"]["name"] == wanted:
            return s
    names = ", ".join(sorted(s["model"]["name"] for s in models))
    raise RayDstackError(f"no deployed service publishes model {wanted!r} (deployed: {names})")


def resolve_token(cli_token: str | None, service: dict[str, Any]) -> str:
    from ray_dstack.cli.service_cmds import saved_token

    if not service.get("auth"):
        return cli_token or "none"
    token = cli_token or os.environ.get(TOKEN_ENV) or saved_token(service["name"])
    if not token:
        raise UsageError(
            f"service {service['name']!r} needs a token: pass --token or set ${TOKEN_ENV} "
            "(the token `ray-dstack deploy` printed)"
        )
    return token


def cmd_chat(args: argparse.Namespace) -> int:
    from ray_dstack.deploy import apps
    from ray_dstack.deploy.local import connect

    try:
        import openai
    except ImportError:
        raise RayDstackError("the OpenAI SDK is not installed: pip install 'ray-dstack[local]' (or openai)") from None

    prompt = " ".join(args.prompt).strip()
    if prompt == "-":
        prompt = sys.stdin.read().strip()
    if not prompt:
        raise UsageError("empty prompt")
    client, _ = connect(args.address, start_if_missing=False)
    with client:
        summaries = apps.service_summaries(client.serve_details(), client.address)
    service = pick_model(summaries, args.model)
    model = service["model"]
    token = resolve_token(args.token, service)
    base_url = args.base_url or model["openai_base_url"]

    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    sdk = openai.OpenAI(base_url=base_url, api_key=token, timeout=args.timeout, max_retries=0)
    wrote_newline = True
    try:
        extra = {} if args.temperature is None else {"temperature": args.temperature}
        stream = sdk.chat.completions.create(
            model=model["name"], messages=messages, stream=True, max_tokens=args.max_tokens, **extra
        )
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        sys.stdout.write(text)
                        sys.stdout.flush()
                        wrote_newline = text.endswith("\n")
    except openai.APIStatusError as exc:
        raise RayDstackError(f"{model['name']} at {base_url} answered {exc.status_code}: {_message(exc)}") from None
    except openai.APIConnectionError as exc:
        raise RayDstackError(f"cannot reach {base_url}: {exc}") from None
    finally:
        sdk.close()
    if not wrote_newline:
        sys.stdout.write("\n")
    return 0


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", exc))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="send one prompt to a deployed model and stream the answer")
    p.add_argument("prompt", nargs="+", help="the prompt (`-` reads it from stdin)")
    p.add_argument(
        "--address",
        help="Ray dashboard address, e.g. http://<head>:8265 (default: $RAY_ADDRESS, else the local cluster)",
    )
    p.add_argument("--model", help="model name (default: the only model deployed)")
    p.add_argument("--token", help=f"service token (default: ${TOKEN_ENV}, else the one saved by deploy)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--base-url", help="OpenAI base URL (default: the cluster's Serve HTTP address + /v1)")
    p.set_defaults(func=cmd_chat)
