"""`format: tgi` end to end: `ray-dstack deploy` resolves the chat template from a Hub at deploy time, the
replica adapts OpenAI requests to a TGI-compatible server running a real (tiny) model, and the official
`openai` SDK talks to it through `/v1` and through the service's own `/<name>/v1`."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import REPO, write_service
from tests.servers.hub_server import VALID_TOKEN, HubServer
from tests.servers.tiny_model import tiny_model_dir

pytestmark = pytest.mark.slow

TOKEN = "tgi-e2e-token-abcdef"
OTHER_TOKEN = "other-service-token-123456"
MODEL = "HuggingFaceH4/zephyr-7b-beta"


@pytest.fixture(scope="module", autouse=True)
def private_hf_cache(cli_cluster, tmp_path_factory):
    """Deploys resolve templates into a cache of their own: a file cached by an earlier run (with a token)
    must not let a gated model through here."""
    cli_cluster.env["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


def tgi_service(name: str, model: str, hub_url: str, python: str, *, extra_env: str = "") -> str:
    return f"""
type: service
name: {name}
commands:
  - exec {python} -m tests.servers.tgi_server --model-dir {tiny_model_dir()} --port $RAY_DSTACK_PORT
working_dir: {REPO}
env:
  - HF_ENDPOINT={hub_url}
{extra_env}
port: 8000
probes:
  - type: http
    url: /health
model:
  type: chat
  name: {model}
  format: tgi
"""


@pytest.fixture(scope="module")
def deployed(cli_cluster, hub, tmp_path_factory):
    import sys

    tmp = tmp_path_factory.mktemp("tgi")
    path = write_service(tmp, "zephyr", tgi_service("zephyr", MODEL, hub.url, sys.executable))
    proc = cli_cluster.run("deploy", str(path), "--token", TOKEN, timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # The printed snippet points at the OpenAI base URL and names the model.
    assert f"{cli_cluster.http}/v1" in proc.stdout and MODEL in proc.stdout
    return cli_cluster


@pytest.fixture(params=["gateway", "service"])
def base_url(request, deployed):
    return f"{deployed.http}/v1" if request.param == "gateway" else f"{deployed.http}/zephyr/v1"


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


def test_sync_chat_non_streaming(base_url):
    client = openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 8
    # Greedy decoding on the real model is deterministic.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_sync_chat_streaming_with_usage(base_url):
    client = openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    non_stream = openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert text == non_stream.choices[0].message.content


def test_async_chat_and_completions(base_url):
    async def go():
        client = openai.AsyncOpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)
        chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        completion = await client.completions.create(model=MODEL, prompt="the cat", max_tokens=5, temperature=0)
        await client.close()
        return chat, streamed, completion

    chat, streamed, completion = asyncio.run(go())
    assert streamed == chat.choices[0].message.content
    assert completion.object == "text_completion" and completion.choices[0].text


def test_models_lists_the_model(deployed):
    client = openai.OpenAI(base_url=f"{deployed.http}/v1", api_key=TOKEN, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "ray-dstack" and models.data[0].created > 0


def test_errors_are_openai_shaped(deployed):
    client = openai.OpenAI(base_url=f"{deployed.http}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{deployed.http}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=MESSAGES
        )
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert "role" in str(bad.value.body.get("param") or bad.value.body.get("message"))
    resp = httpx.post(
        f"{deployed.http}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_deploy_fails_for_unknown_or_gated_model_and_a_token_fixes_gated(cli_cluster, hub, tmp_path):
    import sys

    unknown = write_service(tmp_path, "nope", tgi_service("nope", "acme/does-not-exist", hub.url, sys.executable))
    proc = cli_cluster.run("deploy", str(unknown), "--token", OTHER_TOKEN)
    assert proc.returncode != 0
    assert "acme/does-not-exist" in proc.stderr and "Traceback" not in proc.stderr

    gated_model = "meta-llama/Llama-2-7b-chat-hf"
    gated = write_service(tmp_path, "llama", tgi_service("llama", gated_model, hub.url, sys.executable))
    proc = cli_cluster.run("deploy", str(gated), "--token", OTHER_TOKEN)
    assert proc.returncode != 0 and "HF_TOKEN" in proc.stderr
    names = [s["name"] for s in json.loads(cli_cluster.run("list", "--json", check=True).stdout)]
    assert "nope" not in names and "llama" not in names

    with_token = write_service(
        tmp_path,
        "llama",
        tgi_service("llama", gated_model, hub.url, sys.executable, extra_env=f"  - HF_TOKEN={VALID_TOKEN}"),
    )
    proc = cli_cluster.run("deploy", str(with_token), "--token", OTHER_TOKEN, timeout=400)
    assert proc.returncode == 0, proc.stderr
    # The Hub token never shows in what the CLI prints.
    assert VALID_TOKEN not in proc.stdout + proc.stderr
    status = cli_cluster.status("llama")
    assert status["model"] == {
        "name": gated_model,
        "format": "tgi",
        "openai_base_url": f"{cli_cluster.http}/v1",
        "routing": "prefix",  # the default for a model service
    }

    # Each service's token opens its own model only.
    other = openai.OpenAI(base_url=f"{cli_cluster.http}/v1", api_key=OTHER_TOKEN, max_retries=0)
    reply = other.chat.completions.create(
        model=gated_model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        other.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert [m.id for m in other.models.list().data] == [gated_model]
    cli_cluster.run("delete", "llama", check=True)
