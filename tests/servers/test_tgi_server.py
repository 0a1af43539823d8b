"""The test TGI server (tests/servers/tgi_server.py) speaks TGI's API exactly as tgi-openapi.json describes it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import jsonschema
import pytest

from ray_dstack.ports import free_port
from tests.servers.tgi_server import tgi_server  # noqa: F401 - fixture
from tests.servers.tiny_model import EOS, MODEL_ID, tiny_model_dir

# TGI 3.3.6-dev0's docs/openapi.json (Apache 2.0), copied from /work/shared/reference/ so a clean clone has it.
OPENAPI = Path(__file__).parent.parent / "fixtures" / "tgi-openapi.json"

PROMPT = "hello world"


def _openapi_to_jsonschema(node):
    """OpenAPI 3.0 → JSON Schema: `nullable` becomes a union with null; objects are closed (strict check)."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi_to_jsonschema(v) for k, v in node.items() if k not in ("example", "discriminator")}
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def schemas():
    spec = json.loads(OPENAPI.read_text())
    components = _openapi_to_jsonschema(spec["components"])

    def check(instance, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        jsonschema.Draft202012Validator(schema).validate(instance)

    check.spec = spec
    return check


@pytest.fixture(scope="module")
def client(tgi_server):  # noqa: F811
    with httpx.Client(base_url=tgi_server.url, timeout=30) as c:
        yield c


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data:"), line
        events.append(json.loads(line[len("data:"):]))
    return events


def stream(client, body, path="/generate_stream", headers=None):
    with client.stream("POST", path, json=body, headers=headers or {}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def check_stream(events, schemas, *, details=True):
    assert events, "no events"
    for i, event in enumerate(events, start=1):
        schemas(event, "StreamResponse")
        assert event["index"] == i
        if i < len(events):
            assert event["generated_text"] is None and event["details"] is None
    last = events[-1]
    assert isinstance(last["generated_text"], str)
    if details:
        schemas(last["details"], "StreamDetails")
        assert last["details"]["generated_tokens"] == len(events)
    return last


# --- routes and schemas ---------------------------------------------------------------------------------
def test_info_and_health(client, schemas):
    info = client.get("/info")
    assert info.status_code == 200
    schemas(info.json(), "Info")
    assert info.json()["model_id"] == MODEL_ID
    assert client.get("/health").status_code == 200


def test_generate_with_details_prefill_and_top_tokens(client, schemas):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "decoder_input_details": True, "top_n_tokens": 3}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    schemas(out, "GenerateResponse")
    d = out["details"]
    n_input = len(client.post("/tokenize", json={"inputs": PROMPT}).json())
    assert len(d["prefill"]) == n_input and d["prefill"][0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) for t in d["prefill"][1:])
    assert d["generated_tokens"] == len(d["tokens"]) == len(d["top_tokens"]) <= 6
    assert all(len(top) == 3 for top in d["top_tokens"])
    assert d["seed"] is None  # greedy
    # generated_text is the decoded tokens (special tokens skipped)
    assert out["generated_text"] == "".join(t["text"] for t in d["tokens"] if not t["special"])
    for tok in client.post("/tokenize", json={"inputs": PROMPT}).json():
        schemas(tok, "SimpleToken")


def test_generate_without_details(client, schemas):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": False}})
    schemas(r.json(), "GenerateResponse")
    assert "details" not in r.json()


def test_best_of_sequences(client, schemas):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "best_of": 2, "do_sample": True,
                                             "decoder_input_details": True}}
    out = client.post("/generate", json=body).json()
    schemas(out, "GenerateResponse")
    best = out["details"]
    others = best["best_of_sequences"]
    assert len(others) == 1
    schemas(others[0], "BestOfSequence")
    assert others[0]["prefill"] == best["prefill"]
    assert sum(t["logprob"] for t in best["tokens"]) >= sum(t["logprob"] for t in others[0]["tokens"])
    assert best["seed"] is not None and others[0]["seed"] is not None


def test_compat_route(client, schemas):
    r = client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200
    assert isinstance(r.json(), list) and len(r.json()) == 1
    schemas(r.json()[0], "GenerateResponse")
    events = stream(client, {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True}, path="/")
    last = check_stream(events, schemas)
    assert last["generated_text"] == r.json()[0]["generated_text"]


def test_stream_matches_generate_greedy(client, schemas):
    params = {"max_new_tokens": 8, "top_n_tokens": 2}
    events = stream(client, {"inputs": "the quick brown fox", "parameters": params})
    last = check_stream(events, schemas)
    out = client.post("/generate", json={"inputs": "the quick brown fox", "parameters": params}).json()
    assert [e["token"] for e in events] == out["details"]["tokens"]
    assert [e["top_tokens"] for e in events] == out["details"]["top_tokens"]
    assert last["generated_text"] == out["generated_text"]
    assert last["details"]["finish_reason"] == out["details"]["finish_reason"]
    assert last["details"]["input_length"] == len(client.post("/tokenize", json={"inputs": "the quick brown fox"}).json())


def test_stream_without_details(client, schemas):
    events = stream(client, {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": False}})
    last = check_stream(events, schemas, details=False)
    assert last["details"] is None


def test_stream_is_incremental(client):
    """Events leave the server as tokens are generated, not at the end."""
    t0 = time.monotonic()
    arrivals = []
    body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 5, "stop": ["\u2603"]}}
    with client.stream("POST", "/generate_stream", json=body, headers={"X-Delay-Ms": "150"}) as r:
        for line in r.iter_lines():
            if line:
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 3
    assert arrivals[-1] - arrivals[0] >= 0.15 * (len(arrivals) - 1) * 0.8


def test_sampling_is_reproducible_with_seed(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 42, "top_k": 50,
                                             "top_p": 0.95, "temperature": 0.9}}
    a = client.post("/generate", json=body).json()
    b = client.post("/generate", json=body).json()
    assert a == b and a["details"]["seed"] == 42
    body["parameters"]["seed"] = 43
    c = client.post("/generate", json=body).json()
    assert c["details"]["tokens"] != a["details"]["tokens"]


def test_penalties_and_warpers_accepted(client, schemas):
    for params in ({"repetition_penalty": 1.3}, {"frequency_penalty": 1.5}, {"typical_p": 0.9, "seed": 1},
                   {"top_k": 5, "seed": 2}, {"top_p": 0.5, "seed": 3}, {"watermark": True},
                   {"truncate": 2}):
        out = client.post("/generate", json={"inputs": PROMPT * 3, "parameters": {"max_new_tokens": 4, **params}})
        assert out.status_code == 200, (params, out.text)
        schemas(out.json(), "GenerateResponse")
    # the penalty changes greedy output on a repetitive prompt
    base = client.post("/generate", json={"inputs": "the the the the", "parameters": {"max_new_tokens": 12}}).json()
    pen = client.post("/generate", json={"inputs": "the the the the",
                                         "parameters": {"max_new_tokens": 12, "repetition_penalty": 5.0}}).json()
    assert base["details"]["tokens"] != pen["details"]["tokens"]


def test_return_full_text(client):
    out = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json()
    full = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3,
                                                                           "return_full_text": True}}).json()
    assert full["generated_text"] == PROMPT + out["generated_text"]


# --- finish reasons ---------------------------------------------------------------------------------------
def test_finish_reason_length(client):
    out = client.post("/generate", json={"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 2}}).json()
    if out["details"]["finish_reason"] != "eos_token":
        assert out["details"]["finish_reason"] == "length"
        assert out["details"]["generated_tokens"] == 2


def test_finish_reason_eos_token(client, schemas):
    eos_id = None
    for seed in range(1, 80):
        body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 40, "do_sample": True, "seed": seed}}
        out = client.post("/generate", json=body).json()
        if out["details"]["finish_reason"] == "eos_token":
            last = out["details"]["tokens"][-1]
            assert last["special"] and last["text"] == EOS
            eos_id = last["id"]
            assert EOS not in out["generated_text"]
            events = stream(client, body)
            check_stream(events, schemas)
            assert events[-1]["details"]["finish_reason"] == "eos_token"
            assert events[-1]["token"]["id"] == eos_id and events[-1]["token"]["special"]
            break
    assert eos_id is not None, "no seed reached </s>"


def test_finish_reason_stop_sequence(client, schemas):
    for prompt in ("the the the the", "hello", "red green blue", "one two three four five"):
        free = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 10}}).json()
        texts = [t["text"] for t in free["details"]["tokens"] if not t["special"]]
        if len(texts) >= 4 and "".join(texts[:3]).strip():
            break
    else:
        pytest.fail("no prompt generates 4 tokens greedily")
    stop = "".join(texts[:3]).strip()[-3:]
    out = client.post("/generate", json={"inputs": prompt,
                                         "parameters": {"max_new_tokens": 10, "stop": [stop, "zzzz"]}}).json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["details"]["generated_tokens"] <= 3
    assert out["generated_text"].endswith(stop)  # TGI keeps the stop string
    events = stream(client, {"inputs": prompt, "parameters": {"max_new_tokens": 10, "stop": [stop]}})
    check_stream(events, schemas)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


# --- errors -----------------------------------------------------------------------------------------------
VALIDATION_CASES = [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 4000}, "`inputs` tokens + `max_new_tokens` must be <= 2048"),
    ({"top_n_tokens": 9}, "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
]


@pytest.mark.parametrize(("params", "message"), VALIDATION_CASES)
def test_validation_errors(client, schemas, params, message):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 422
    schemas(r.json(), "ErrorResponse")
    assert r.json()["error_type"] == "validation" and r.json()["error"].startswith(message)
    # streaming: HTTP 200 and one SSE error event, as TGI does
    if "best_of" not in params:
        events = stream(client, {"inputs": PROMPT, "parameters": params})
        assert len(events) == 1
        schemas(events[0], "ErrorResponse")
        assert events[0]["error"].startswith(message)


def test_other_errors(client, schemas):
    for body in ({"inputs": ""}, {"parameters": {}}, {"inputs": 3}, {"inputs": "x", "parameters": {"seed": "a"}},
                 {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}):
        r = client.post("/generate", json=body)
        assert r.status_code == 422, body
        schemas(r.json(), "ErrorResponse")
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    schemas(r.json(), "ErrorResponse")
    r = client.post("/generate", json={"inputs": "word " * 1500})
    assert r.status_code == 422 and "`inputs` must have less than 1024 tokens" in r.json()["error"]
    for stream_only in ({"best_of": 2, "do_sample": True}, {"decoder_input_details": True}):
        events = stream(client, {"inputs": PROMPT, "parameters": stream_only})
        schemas(events[0], "ErrorResponse")
        assert "streaming" in events[0]["error"]


def test_fault_injection(client, schemas):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "stop": ["\u2603"]}}
    r = client.post("/generate", json=body, headers={"X-Fail": "before-first-token"})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    schemas(r.json(), "ErrorResponse")
    events = stream(client, body, headers={"X-Fail": "before-first-token"})
    assert len(events) == 1 and events[0]["error_type"] == "generation"
    events = stream(client, body, headers={"X-Fail": "mid-stream", "X-Fail-After": "2"})
    assert len(events) == 3
    for e in events[:2]:
        schemas(e, "StreamResponse")
    schemas(events[2], "ErrorResponse")
    assert events[2]["error_type"] == "generation"
    r = client.post("/generate", json=body, headers={"X-Fail": "overloaded"})
    assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    r = client.post("/generate", json=body, headers={"X-Fail": "http-500"})
    assert r.status_code == 500
    schemas(r.json(), "ErrorResponse")
    with pytest.raises(httpx.HTTPError):
        with client.stream("POST", "/generate_stream", json=body, headers={"X-Fail": "abort"}) as resp:
            for _ in resp.iter_lines():
                pass


# --- the official client ----------------------------------------------------------------------------------
def test_text_generation_client(tgi_server):  # noqa: F811
    from text_generation import AsyncClient, Client
    from text_generation.errors import ValidationError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = Client(tgi_server.url, timeout=30)
        out = client.generate(PROMPT, max_new_tokens=5, decoder_input_details=True)
        assert out.details.generated_tokens == len(out.details.tokens)
        assert len(out.details.prefill) > 0
        sampled = client.generate(PROMPT, max_new_tokens=5, do_sample=True, best_of=2)
        assert len(sampled.details.best_of_sequences) == 1
        responses = list(client.generate_stream(PROMPT, max_new_tokens=5))
        assert responses[-1].details is not None
        assert responses[-1].generated_text == out.generated_text
        assert [r.token.id for r in responses] == [t.id for t in out.details.tokens]
        with pytest.raises(ValidationError):
            client.generate(PROMPT, max_new_tokens=4000)

        import asyncio

        async def run_async():
            aclient = AsyncClient(tgi_server.url, timeout=30)
            a = await aclient.generate(PROMPT, max_new_tokens=5)
            chunks = [r async for r in aclient.generate_stream(PROMPT, max_new_tokens=5)]
            return a, chunks

        a, chunks = asyncio.run(run_async())
        assert a.generated_text == out.generated_text
        assert chunks[-1].generated_text == out.generated_text


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_serves(tmp_path):
    port = free_port()
    root = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.tgi_server", "--model-dir", str(tiny_model_dir()), "--port", str(port)],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and "generated_text" in r.json()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_openapi_converter_sanity(schemas):
    with pytest.raises(jsonschema.ValidationError):
        schemas({"index": 1, "token": {"id": 1, "text": "a", "logprob": 0.0, "special": False}, "extra": 1},
                "StreamResponse")
    with pytest.raises(jsonschema.ValidationError):
        schemas({"finish_reason": "stop", "generated_tokens": 1, "input_length": 1}, "StreamDetails")
    schemas({"finish_reason": "length", "generated_tokens": 1, "input_length": 1, "seed": None}, "StreamDetails")
    assert copy.deepcopy(schemas.spec)["paths"]["/generate_stream"]
