"""Clients, unmodified, against a deployed service's `/v1`: the openai SDK (sync, async, streaming,
`with_raw_response`), LangChain's `ChatOpenAI` (invoke, stream, batch) and guidellm's benchmark.

Two services on one local Ray, both reached through the gateway's `/v1` with one token:
* `format: openai`: llama.cpp's OpenAI server on the demo's GGUF (`python -m ray_dstack.demo.model_server serve`,
  whichever model the demo ships; the test names it by its own alias). The gateway passes it through.
* `format: tgi`: the tiny random-weight Llama behind the TGI-wire test server; ray-dstack's own OpenAI
  adapter answers.
Each client runs against both, as a user would point it: base URL and API key, nothing else.

guidellm (its own console script, a subprocess) needs a tokenizer for its synthetic prompts and cannot reach
the Hub: it gets the tiny model's directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import openai
import pytest
from conftest import BIN, REPO, write_service

from tests.servers.tiny_model import CHAT_TEMPLATE, EOS, tiny_model_dir

pytestmark = pytest.mark.slow

TOKEN = "clients-e2e-token-0123456789"
LLAMA = "clients-llama"
TINY = "ray-dstack/tiny-random-llama"
MODELS = [LLAMA, TINY]
MAX_TOKENS = 8
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def llama_service() -> str:
    return f"""
type: service
name: clients-llama
commands:
  - exec {sys.executable} -m ray_dstack.demo.model_server serve --port $RAY_DSTACK_PORT --alias {LLAMA}
working_dir: {REPO}
port: 8000
probes:
  - type: http
    url: /health
    interval: 1
    timeout: 5
model:
  type: chat
  name: {LLAMA}
  format: openai
"""


def tiny_service() -> str:
    return f"""
type: service
name: clients-tiny
commands:
  - exec {sys.executable} -m tests.servers.tgi_server --model-dir {tiny_model_dir()} --port $RAY_DSTACK_PORT
working_dir: {REPO}
port: 8000
probes:
  - type: http
    url: /health
    interval: 1
model:
  type: chat
  name: {TINY}
  format: tgi
  eos_token: "{EOS}"
  chat_template: {json.dumps(CHAT_TEMPLATE)}
"""


@pytest.fixture(scope="module")
def base_url(cli_cluster, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("clients")
    for name, text in [("clients-llama", llama_service()), ("clients-tiny", tiny_service())]:
        proc = cli_cluster.run("deploy", str(write_service(tmp, name, text)), "--token", TOKEN, timeout=400)
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return f"{cli_cluster.http}/v1"


@pytest.fixture
def client(base_url):
    with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


def test_sdk_lists_both_models(client):
    assert {m.id for m in client.models.list()} == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_sdk_sync_chat_and_completions(client, model):
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Greedy, as the chat call above: sampled, the tiny random model (its EOS boosted) sometimes ends at once.
    legacy = client.completions.create(model=model, prompt="The capital of France is", max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert legacy.object == "text_completion" and legacy.choices[0].text
    assert 0 < legacy.usage.completion_tokens <= MAX_TOKENS


@pytest.mark.parametrize("model", MODELS)
def test_sdk_sync_streaming(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces).strip() and sum(1 for p in pieces if p) <= MAX_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"], ["length"])


# llama-cpp-python 0.3.36's own server ignores `max_completion_tokens` (the name the SDK documents and LangChain
# always sends) and `stream_options.include_usage`; the passthrough forwards bytes by design, so the demo server
# (ray_dstack/demo/model_server.py, OpenAIFieldsMiddleware) makes both work.


@pytest.mark.parametrize("model", MODELS)
def test_token_limit_under_its_current_name(base_url, client, model):
    from langchain_openai import ChatOpenAI

    reply = client.chat.completions.create(model=model, messages=QUESTION, max_completion_tokens=3)
    assert reply.choices[0].message.content and 0 < reply.usage.completion_tokens <= 3
    llm = ChatOpenAI(model=model, base_url=base_url, api_key=TOKEN, max_tokens=3, max_retries=0, timeout=120)
    answer = llm.invoke("What is the capital of France?")
    assert answer.content and 0 < answer.usage_metadata["output_tokens"] <= 3


@pytest.mark.parametrize("model", MODELS)
def test_stream_usage(base_url, client, model):
    from langchain_openai import ChatOpenAI

    chunks = list(client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}))
    # include_usage: a last chunk with no choices carries the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    assert 0 < chunks[-1].usage.completion_tokens <= MAX_TOKENS
    llm = ChatOpenAI(model=model, base_url=base_url, api_key=TOKEN, max_retries=0, timeout=120, stream_usage=True,
                     max_tokens=MAX_TOKENS)
    streamed = list(llm.stream("Name a colour."))
    whole = sum(streamed[1:], streamed[0])
    assert whole.usage_metadata["input_tokens"] > 0 and 0 < whole.usage_metadata["output_tokens"] <= MAX_TOKENS


@pytest.mark.parametrize("model", MODELS)
def test_sdk_async_concurrent_and_streamed(base_url, model):
    async def main():
        async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=120) as c:
            replies = await asyncio.gather(*[
                c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                          max_tokens=MAX_TOKENS)
                for q in ("Name a colour.", "What is 2 + 3?")])
            stream = await c.chat.completions.create(model=model, messages=QUESTION, max_tokens=MAX_TOKENS,
                                                     stream=True)
            pieces = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            return replies, pieces

    replies, pieces = asyncio.run(main())
    assert len({r.id for r in replies}) == 2
    assert all(r.choices[0].message.content.strip() and r.usage.completion_tokens > 0 for r in replies)
    assert "".join(pieces).strip() and sum(1 for p in pieces if p) <= MAX_TOKENS


@pytest.mark.parametrize("model", MODELS)
def test_sdk_raw_and_streaming_responses(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=QUESTION, max_tokens=MAX_TOKENS)
    assert raw.status_code == 200 and raw.http_response.reason_phrase == "OK"
    assert raw.headers["content-type"].startswith("application/json")
    assert str(raw.http_request.url) == f"{client.base_url}chat/completions"
    parsed = raw.parse()
    assert parsed.choices[0].message.content.strip() and parsed.usage.completion_tokens > 0
    # The SDK exposes the endpoint's request id (OpenAI's `x-request-id`) for support and logs.
    assert raw.request_id and parsed._request_id == raw.request_id

    with client.chat.completions.with_streaming_response.create(
            model=model, messages=QUESTION, max_tokens=MAX_TOKENS, stream=True) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert json.loads(lines[0][len("data: "):])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("model", MODELS)
def test_langchain_invoke_stream_batch(base_url, model):
    from langchain_core.messages import AIMessageChunk
    from langchain_openai import ChatOpenAI

    # LangChain sends `max_tokens` as `max_completion_tokens`; the bound is checked in
    # test_token_limit_under_its_current_name (the llama backend ignores it).
    llm = ChatOpenAI(model=model, base_url=base_url, api_key=TOKEN, temperature=0, max_retries=0, timeout=120,
                     max_tokens=MAX_TOKENS)
    answer = llm.invoke("What is the capital of France?")
    assert answer.content.strip()
    assert answer.response_metadata["model_name"] == model
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["input_tokens"] > 0 and answer.usage_metadata["output_tokens"] > 0

    chunks = list(llm.stream("Name a colour."))
    assert len(chunks) > 1 and all(isinstance(c, AIMessageChunk) for c in chunks)
    whole = sum(chunks[1:], chunks[0])
    assert whole.content.strip() and whole.response_metadata["finish_reason"] in ("stop", "length")

    batch = llm.batch(["What is 2 + 3?", "Translate 'cat' into French.", "Name a planet."])
    assert len(batch) == 3 and all(m.content.strip() for m in batch)
    assert all(m.usage_metadata["output_tokens"] > 0 for m in batch)


# The tiny model only: guidellm also sends `ignore_eos`, which llama.cpp's server ignores, so there its answers
# end at the model's end of turn instead of the requested length (6 of 6 succeeded too, in a longer run).
@pytest.mark.parametrize("model", [TINY])
def test_guidellm_fixed_rate_run_succeeds(base_url, model, tmp_path):
    rate, count = 2, 6
    out = tmp_path / "benchmarks.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               # One worker process: the machine has 2 cores and the server is on them too.
               GUIDELLM__MAX_WORKER_PROCESSES="1", GUIDELLM__LOGGING__LOG_FILE=str(tmp_path / "guidellm.log"))
    cmd = [str(BIN / "guidellm"), "run",
           "--backend", f"kind=openai_http,target={base_url},model={model},api_key={TOKEN}",
           "--profile", f"kind=constant,rate={rate}",
           "--constraint", f"kind=max_requests,count={count}",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_model_dir()}",
           "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=4",
           "--output", f"kind=json,path={out}",
           "--disable-console"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads(out.read_text())["benchmarks"][0]
    made = bench["scheduler_metrics"]["requests_made"]
    assert made == {"successful": count, "errored": 0, "incomplete": 0, "total": count}, (made, time.monotonic() - started)
    assert bench["config"]["strategy"]["type_"] == "constant" and bench["config"]["strategy"]["rate"] == rate
    requests = bench["requests"]["successful"]
    # Each request answered without error; a random-weight model sampling at guidellm's default temperature may
    # end one at its first token (an empty completion is an answer), so text is required overall, not of each.
    assert len(requests) == count and all(r["info"]["error"] is None for r in requests)
    assert any(r["output"] for r in requests)
    metrics = bench["metrics"]
    assert metrics["time_to_first_token_ms"]["successful"]["mean"] > 0
    assert metrics["output_token_count"]["successful"]["total_sum"] > 0
