"""The gateway's OpenAPI document (ray_dstack/openai/openapi.py): valid OpenAPI 3.1, and it lists every route the
gateway answers — `GET /health` without a token, the adapted `/v1` routes, and the passthrough `POST /v1/{route}`."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from ray_dstack.openai.endpoint import is_passthrough_route
from ray_dstack.openai.openapi import openapi_document

REF_PREFIX = "#/components/schemas/"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for one schema of the document, its `$ref`s resolved against the whole document."""
    doc = openapi_document()
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def _json_schema(operation: dict[str, Any], status: str) -> dict[str, Any]:
    return operation["responses"][status]["content"]["application/json"]["schema"]


def test_document_is_valid_openapi_3_1_and_json():
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert json.loads(json.dumps(doc)) == doc  # the gateway answers it as JSON


def test_every_ref_resolves_to_a_component_schema():
    doc = openapi_document()
    refs = _refs(doc)
    assert refs, "the document should reference its component schemas"
    schemas = doc["components"]["schemas"]
    for ref in refs:
        assert ref.startswith(REF_PREFIX), ref
        assert ref.removeprefix(REF_PREFIX) in schemas, ref


def test_health_is_listed_without_security():
    health = openapi_document()["paths"]["/health"]["get"]
    assert health["security"] == []  # overrides the document-wide bearer requirement
    assert "nothing" in health["summary"]
    schema = _validator(_json_schema(health, "200"))
    schema.validate({"status": "ok"})
    assert not schema.is_valid({"status": 1})
    assert not schema.is_valid({})


def test_openapi_json_lists_itself():
    doc = openapi_document()
    get = doc["paths"]["/v1/openapi.json"]["get"]
    assert _validator(_json_schema(get, "200")).is_valid(doc)


@pytest.mark.parametrize(("path", "method", "request_ref", "answer_ref"), [
    ("/v1/chat/completions", "post", "ChatCompletionRequest", "ChatCompletion"),
    ("/v1/completions", "post", "CompletionRequest", "Completion"),
    ("/v1/models", "get", None, "ModelList"),
])
def test_adapted_routes_are_listed_with_their_models(path, method, request_ref, answer_ref):
    operation = openapi_document()["paths"][path][method]
    assert "security" not in operation  # the document-wide bearer token applies
    if request_ref is not None:
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": REF_PREFIX + request_ref}
    assert _json_schema(operation, "200") == {"$ref": REF_PREFIX + answer_ref}
    assert _json_schema(operation, "401") == {"$ref": REF_PREFIX + "Error"}


def test_passthrough_route_requires_model_and_keeps_other_fields():
    post = openapi_document()["paths"]["/v1/{route}"]["post"]
    assert "security" not in post
    assert "byte for byte" in post["description"] and "format: tgi" in post["description"]
    body = post["requestBody"]
    assert body["required"] is True
    schema = _validator(body["content"]["application/json"]["schema"])
    schema.validate({"model": "emb", "input": ["a", "b"], "encoding_format": "float"})
    assert not schema.is_valid({"input": "a"})  # no model: nothing to route by
    assert not schema.is_valid({"model": 3})
    assert not schema.is_valid(["model"])
    responses = post["responses"]
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    for status in ("400", "401", "404", "429", "502", "503", "504"):
        assert _json_schema(post, status) == {"$ref": REF_PREFIX + "Error"}, status


@pytest.mark.parametrize("route", [
    "embeddings", "responses", "rerank", "tokenize", "detokenize", "audio/speech", "score", "v2.rerank",
    "../secret", "a..b", "a//b", "/embeddings", "embeddings/", "", "a b", "a%2Fb", "rerank?x=1",
])
def test_route_parameter_pattern_agrees_with_the_gateway(route):
    (parameter,) = openapi_document()["paths"]["/v1/{route}"]["post"]["parameters"]
    assert parameter["in"] == "path" and parameter["name"] == "route" and parameter["required"] is True
    # JSON Schema patterns are unanchored: the document anchors it, so `search` is the schema's own reading.
    documented = re.search(parameter["schema"]["pattern"], route) is not None
    assert documented == is_passthrough_route(route)
