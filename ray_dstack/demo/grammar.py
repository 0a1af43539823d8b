"""JSON schema → llama.cpp grammar, for the demo server's `response_format: {"type": "json_schema"}`
(ray_dstack/demo/model_server.py): llama-cpp-python 0.3.36's server accepts only `text` and `json_object`, but
llama.cpp constrains an answer to a grammar, and llama-cpp-python converts a JSON schema into one.

Part of the demo server's program: imports nothing of ray_dstack outside ray_dstack/demo/.
"""

from __future__ import annotations

import json

# A JSON schema's length bounds (`maxLength`, `maxItems`, ...) become repetitions in the grammar, one nesting level
# per unit of a maximum: llama.cpp refuses a grammar past about 1,000 (measured: a string's `maxLength` 1,000
# parses, 1,500 does not), and the grammar's size grows with their sum. Larger maximums are lowered to this (an
# answer within it still validates), larger minimums are refused, and so is a schema whose bounds add up past
# SCHEMA_BOUNDS_TOTAL (20 strings of 1,000: a 160 kB grammar, 40 ms to build on this machine).
SCHEMA_BOUND_MAX = 1000
SCHEMA_BOUNDS_TOTAL = 20000
# llama-cpp-python 0.3.36's schema converter lets a string hold raw control characters (`char ::= [^"\\] | ...`),
# which JSON forbids: asked for a poem, this model put a raw newline in it. The rule its own JSON grammar uses:
JSON_CHAR_RULE = (r'char ::= [^"\\\x7F\x00-\x1F] | '
                  r'"\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')


class RequestError(ValueError):
    """A request the server answers with 400 `invalid_request_error`; `param` is the field's dotted path."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def body(self) -> bytes:
        return json.dumps({"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                                     "code": None}}).encode()


_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema
_DATA = ("const", "enum", "default", "examples")  # values, not schemas


def _bounded_schema(schema: dict, param: str) -> dict:
    """`schema` with maximums above SCHEMA_BOUND_MAX lowered to it (see there); RequestError where it cannot be."""
    total = 0

    def walk(node):
        nonlocal total
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: walk(sub) for name, sub in value.items()}
            elif key in _BOUNDS and isinstance(value, int) and not isinstance(value, bool):
                if value > SCHEMA_BOUND_MAX:
                    if key.startswith("min"):
                        raise RequestError(f"`{param}`: `{key}: {value}` is more than this server can constrain an "
                                           f"answer to (at most {SCHEMA_BOUND_MAX})", param)
                    value = SCHEMA_BOUND_MAX
                total += max(value, 0)
                out[key] = value
            elif key not in _DATA and isinstance(value, (dict, list)):
                out[key] = walk(value)
            else:
                out[key] = value
        return out

    bounded = walk(schema)
    if total > SCHEMA_BOUNDS_TOTAL:
        raise RequestError(f"`{param}`: its length and item bounds add up to {total}, more than this server can "
                           f"constrain an answer to (at most {SCHEMA_BOUNDS_TOTAL})", param)
    return bounded


def _root_unreferenced(schema: dict) -> dict:
    """`schema` with a root `$ref` (pydantic's schema of a recursive model) replaced by what it points to, the
    root's `$defs` kept: llama-cpp-python's converter resolves no `$ref` below a root that is one."""
    seen = set()
    while isinstance(ref := schema.get("$ref"), str) and ref.startswith("#/") and ref not in seen:
        seen.add(ref)
        target = schema
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            break  # the converter names the ref it cannot resolve
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
    return schema


def schema_grammar(schema: dict, param: str, parses=None) -> str:
    """The llama.cpp grammar (GBNF) for answers that are JSON valid against the JSON schema `schema`: its
    structure, types, `required`, `additionalProperties: false`, `$defs`/`$ref`, `enum`/`const`, `anyOf`, string
    lengths, formats and patterns, array lengths. llama-cpp-python's converter does not enforce numeric ranges
    (`minimum`, `maximum`, `multipleOf`), `uniqueItems` or `minProperties`/`maxProperties`.

    RequestError (400, naming `param`) for a schema the converter cannot handle or, given `parses` (a check by
    llama.cpp's own parser, see `GrammarParser`), a grammar llama.cpp would refuse: llama-cpp-python would
    otherwise fall back to any JSON, or (a grammar llama.cpp refuses) crash the server.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(_root_unreferenced(_bounded_schema(schema, param))))
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(f"`{param}` is nested too deeply", param) from None
    except Exception as exc:  # the converter's own asserts and errors, on whatever schema a client sends
        raise RequestError(f"`{param}` cannot be turned into a grammar: {exc or type(exc).__name__}", param) from None
    grammar = "\n".join(JSON_CHAR_RULE if line.startswith("char ::= ") else line for line in grammar.split("\n"))
    if parses is not None and not parses(grammar):
        raise RequestError(f"`{param}`: llama.cpp refuses the grammar for this schema (too complex; the server log "
                           "says why)", param)
    return grammar


def response_format_schema(rf) -> tuple[dict, str] | None:
    """The JSON schema a chat request's `response_format` constrains the answer to, and its field's path; None
    for `text` and plain `json_object` (llama-cpp-python handles those). RequestError if it is malformed."""
    if not isinstance(rf, dict):
        raise RequestError('`response_format` must be an object such as {"type": "json_schema", "json_schema": '
                           '{"name": "...", "schema": {...}}}', "response_format")
    kind = rf.get("type")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError('`response_format.json_schema` must be an object: {"name": "...", "schema": {...}, '
                               '"strict": true}', "response_format.json_schema")
        for key, kinds, what in (("name", str, "a string"), ("description", str, "a string"),
                                 ("strict", bool, "true or false")):
            if spec.get(key) is not None and not isinstance(spec[key], kinds):
                raise RequestError(f"`response_format.json_schema.{key}` must be {what}",
                                   f"response_format.json_schema.{key}")
        if "schema" not in spec:
            raise RequestError("`response_format.json_schema.schema` is required: the JSON schema the answer must "
                               "follow", "response_format.json_schema.schema")
        if not isinstance(spec["schema"], dict):
            raise RequestError("`response_format.json_schema.schema` must be a JSON schema object",
                               "response_format.json_schema.schema")
        return spec["schema"], "response_format.json_schema.schema"
    if kind == "json_object" and rf.get("schema") is not None:  # llama-cpp-python's own form
        if not isinstance(rf["schema"], dict):
            raise RequestError("`response_format.schema` must be a JSON schema object", "response_format.schema")
        return rf["schema"], "response_format.schema"
    if kind in ("text", "json_object"):
        return None
    raise RequestError("`response_format.type` must be `text`, `json_object` or `json_schema`", "response_format.type")
