"""A `repos` entry with `url`, cloned by each replica before its commands start.

Credentials a URL carries (`https://user:token@host/...`) never reach a command line, a log or the clone's
`.git/config`: git is given the URL without them, and an `url.<with credentials>.insteadOf` rule in its
environment (GIT_CONFIG_COUNT, readable by root and the replica only) puts them back when it connects. Every
message git prints is scrubbed of them too. git never prompts (no terminal, ssh in batch mode).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ray_dstack.serve.runtime.packages import FilesError
from ray_dstack.spec import GitRepoSpec

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s]+)@")


def scrub_url(text: str) -> str:
    """`text` with every `scheme://user:password@` (or `scheme://token@`) shown as `scheme://***@`."""
    return _USERINFO.sub(r"\1***@", text)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user info, the user info or None)."""
    match = _USERINFO.match(url)
    if match is None:
        return url, None
    return match.group(1) + url[match.end():], match.group(2)


def _git_env(url: str, public: str, dest: Path | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_CONFIG_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"})
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    config = []
    if public != url:
        config.append((f"url.{url}.insteadOf", public))
    if dest is not None:  # the directory may already belong to the service's `user`: root still checks out there
        config.append(("safe.directory", str(dest)))
    for i, (key, value) in enumerate(config):
        env.update({f"GIT_CONFIG_KEY_{i}": key, f"GIT_CONFIG_VALUE_{i}": value})
    if config:
        env["GIT_CONFIG_COUNT"] = str(len(config))
    return env


def _run(argv: list[str], *, env: dict[str, str], timeout_s: float, what: str, secret: str | None,
         cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FilesError(f"repos: {what} took longer than {timeout_s:.0f}s") from None
    if done.returncode != 0:
        message = scrub_url((done.stderr or done.stdout or "").strip())
        if secret:
            message = message.replace(secret, "***")
        raise FilesError(f"repos: {what} failed: {message or f'git exited with code {done.returncode}'}")


def clone(repo: GitRepoSpec, dest: Path, *, timeout_s: float) -> None:
    """Clone into `dest` (missing or an empty directory), then check out `hash` when given."""
    git = shutil.which("git")
    public, userinfo = _split_credentials(repo.url)
    shown = scrub_url(repo.url)
    if git is None:
        raise FilesError(f"repos: cloning {shown} needs git on this node: install git there, or use an `image` with git")
    env = _git_env(repo.url, public, dest)
    argv = [git, "clone", "--quiet"]
    if repo.branch:
        argv += ["--branch", repo.branch]
    if repo.single_branch:
        argv.append("--single-branch")
    what = f"cloning {shown}" + (f" (branch {repo.branch})" if repo.branch else "")
    _run([*argv, "--", public, str(dest)], env=env, timeout_s=timeout_s, what=what, secret=userinfo)
    if repo.hash:
        _run([git, "checkout", "--quiet", "--detach", repo.hash, "--"], env=env, timeout_s=timeout_s, cwd=dest,
             what=f"checking out {repo.hash} of {shown}", secret=userinfo)
