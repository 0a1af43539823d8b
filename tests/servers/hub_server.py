"""A local stand-in for the Hugging Face Hub, enough for `huggingface_hub.hf_hub_download`.

Serves the repositories under `tests/fixtures/hub/<org>/<model>/` (or any directory given) at
`/<repo_id>/resolve/<revision>/<filename>` (HEAD and GET with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`,
`Content-Length`, like huggingface.co for a regular file) and `/api/models/<repo_id>`; answers like the
Hub for failures (`X-Error-Code` / `X-Error-Message` headers that huggingface_hub turns into typed errors):

* unknown repository → 404 `RepoNotFound`; unknown file → 404 `EntryNotFound`; revision other than
  `main` → 404 `RevisionNotFound`;
* gated repositories (default: every `meta-llama/*` repo) → 401 `GatedRepo` without a token, 401
  "Invalid credentials in Authorization header" with an unknown token, 403 `GatedRepo` with a valid token
  that has no access (`NO_ACCESS_TOKEN`), 200 with `VALID_TOKEN`;
* the repository `acme/server-error` → 500.

Use it in-process: `with HubServer() as hub: env = {"HF_ENDPOINT": hub.url}`, or the pytest fixture
`hub_server` (import it into the test module). Every request is recorded in `hub.requests`.
Standalone: `python -m tests.servers.hub_server --port 8765`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "hub"
VALID_TOKEN = "hf_test_valid_token_0123456789"
NO_ACCESS_TOKEN = "hf_test_no_access_token_0123456789"
DEFAULT_GATED = ("meta-llama/",)
SERVER_ERROR_REPO = "acme/server-error"


@dataclass
class RecordedRequest:
    method: str
    path: str
    authorization: str | None


class HubServer:
    """The fake Hub on a free loopback port, served from a daemon thread."""

    def __init__(
        self,
        root: str | Path = FIXTURES_DIR,
        *,
        gated: tuple[str, ...] = DEFAULT_GATED,
        valid_tokens: tuple[str, ...] = (VALID_TOKEN,),
        no_access_tokens: tuple[str, ...] = (NO_ACCESS_TOKEN,),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        self.gated = gated
        self.valid_tokens = set(valid_tokens)
        self.no_access_tokens = set(no_access_tokens)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hf-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repository model ------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path | None:
        if not repo_id or ".." in repo_id.split("/"):
            return None
        path = self.root / repo_id
        return path if path.is_dir() else None

    def commit(self, repo_id: str) -> str:
        digest = hashlib.sha1(repo_id.encode())
        repo = self.repo_dir(repo_id)
        if repo is not None:
            for f in sorted(repo.rglob("*")):
                if f.is_file():
                    digest.update(str(f.relative_to(repo)).encode())
                    digest.update(f.read_bytes())
        return digest.hexdigest()

    def is_gated(self, repo_id: str) -> bool:
        return any(repo_id.startswith(prefix) for prefix in self.gated)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        # ------------------------------------------------------------------------------------------
        def _serve(self, *, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            auth = self.headers.get("Authorization")
            hub.record(RecordedRequest(self.command, path, auth))
            if path.startswith("/api/models/"):
                repo_id = path[len("/api/models/"):].strip("/")
                if not self._check_access(repo_id, head):
                    return
                files = sorted(
                    str(f.relative_to(hub.repo_dir(repo_id))) for f in hub.repo_dir(repo_id).rglob("*") if f.is_file()
                )
                body = json.dumps({
                    "id": repo_id, "modelId": repo_id, "sha": hub.commit(repo_id), "private": False,
                    "gated": "manual" if hub.is_gated(repo_id) else False,
                    "siblings": [{"rfilename": f} for f in files],
                }).encode()
                self._send(200, body, {"Content-Type": "application/json"}, head=head)
                return
            if "/resolve/" not in path:
                self._error(404, None, "Not Found", head)
                return
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            if not self._check_access(repo_id, head):
                return
            commit = hub.commit(repo_id)
            if revision not in ("main", commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head, commit=None)
                return
            file = hub.repo_dir(repo_id) / filename
            if not filename or ".." in filename.split("/") or not file.is_file():
                self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", head, commit=commit)
                return
            data = file.read_bytes()
            blob_sha = hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()  # git's blob id
            etag = f'"{blob_sha}"'
            content_type = "application/json" if filename.endswith(".json") else "text/plain; charset=utf-8"
            self._send(200, data, {
                "Content-Type": content_type,
                "ETag": etag,
                "X-Repo-Commit": commit,
                "Accept-Ranges": "bytes",
            }, head=head)

        def _check_access(self, repo_id: str, head: bool) -> bool:
            if repo_id == SERVER_ERROR_REPO:
                self._error(500, None, "Internal Error - We're working hard to fix this as soon as possible!", head)
                return False
            if hub.repo_dir(repo_id) is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return False
            if hub.is_gated(repo_id):
                auth = self.headers.get("Authorization") or ""
                token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
                if token is None:
                    self._error(401, "GatedRepo", (
                        f"Access to model {repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in."), head)
                    return False
                if token in hub.no_access_tokens:
                    self._error(403, "GatedRepo", (
                        f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                        f"Visit https://huggingface.co/{repo_id} to ask for access."), head)
                    return False
                if token not in hub.valid_tokens:
                    self._error(401, None, "Invalid credentials in Authorization header", head)
                    return False
            return True

        def _error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code is not None:
                headers["X-Error-Code"] = code
            if commit is not None:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def free_port_url(host: str = "127.0.0.1") -> str:
    """A URL where nothing listens (for "Hub unreachable" tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"http://{host}:{port}"


@pytest.fixture
def hub_server():
    """A fresh fake Hub per test (starts in a few ms); `hub_server.url` is its HF_ENDPOINT."""
    with HubServer() as hub:
        yield hub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Hugging Face Hub serving tests/fixtures/hub")
    parser.add_argument("--root", default=str(FIXTURES_DIR))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    hub = HubServer(args.root, host=args.host, port=args.port)
    print(f"fake Hub on {hub.url} (valid token: {VALID_TOKEN})", flush=True)
    try:
        hub._httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
