"""`.gitignore` / `.dstackignore` rules as dstack applies them when it packs `files` and a local `repos` entry.

dstack walks each entry with ripgrep's `ignore` crate (`utils/files.py`: `WalkBuilder(root).hidden(False)
.require_git(False).add_custom_ignore_filename(".dstackignore")`, `.git/` at the root left out). What that means,
and what this module does:

- git's pattern syntax (`gitignore(5)`): `#` comments, `!` re-includes, a trailing `/` matches directories only,
  a `/` at the start or in the middle anchors the pattern to the ignore file's directory, `*`, `?`, `[...]`
  never match `/`, `**/`, `/**/` and `/**` span directories; the last matching line of a file decides;
- every directory's ignore files apply to what lies below it, the closest directory's matching file first;
- a `.dstackignore` decides before any `.gitignore` (the crate ranks custom ignore files above git's), so
  `!pattern` in `.dstackignore` brings back what `.gitignore` left out;
- an ignored directory is not entered: nothing below it comes back, whatever the deeper rules say;
- `.gitignore` counts even outside a git repository (`require_git(False)`); hidden files are kept.

Which directories above the entry count is `ancestors()`' business (the crate reads every parent up to `/`;
ray-dstack stops at the repository root or the configuration's directory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

IGNORE_FILES = (".dstackignore", ".gitignore")  # in precedence order


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def _translate(body: str) -> str:
    """A gitignore glob (without its leading/trailing `/`) as a regex body over `/`-separated relative paths."""
    out, i, n = [], 0, len(body)
    while i < n:
        if body.startswith("**/", i) and (i == 0 or body[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i) and i + 2 == n and (i == 0 or body[i - 1] == "/"):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            while i < n and body[i] == "*":  # any other run of stars is one `*`
                i += 1
            out.append("[^/]*")
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        elif body[i] == "[":
            end = i + 1
            if end < n and body[end] in "!^":
                end += 1
            if end < n and body[end] == "]":
                end += 1
            end = body.find("]", end)
            if end < 0:  # no closing bracket: a literal `[`
                out.append(re.escape("["))
                i += 1
                continue
            inner = body[i + 1:end]
            negate = inner[:1] in ("!", "^")
            inner = inner[1:] if negate else inner
            inner = "".join("\\" + ch if ch in "\\^[]" else ch for ch in inner)
            out.append(f"[^/{inner}]" if negate else f"(?!/)[{inner}]")
            i = end + 1
        elif body[i] == "\\" and i + 1 < n:
            out.append(re.escape(body[i + 1]))
            i += 2
        else:
            out.append(re.escape(body[i]))
            i += 1
    return "".join(out)


def parse_line(line: str) -> Rule | None:
    """One line of an ignore file; None for blanks and comments."""
    line = line.rstrip("\n").rstrip("\r")
    # Trailing spaces go unless escaped (`foo\ ` keeps one).
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        stripped += " "
    line = stripped
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    elif line.startswith("\\!") or line.startswith("\\#"):
        line = line[1:]
    dir_only = line.endswith("/") and not line.endswith("\\/")
    if dir_only:
        line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    if not line:
        return None
    prefix = "^" if anchored else "^(?:.*/)?"
    return Rule(re.compile(prefix + _translate(line) + "$", re.DOTALL), negated, dir_only)


@lru_cache(maxsize=1024)
def _rules_of(path: Path, mtime_ns: int) -> tuple[Rule, ...]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ()
    return tuple(rule for line in text.splitlines() if (rule := parse_line(line)) is not None)


def rules_in(directory: Path, filename: str) -> tuple[Rule, ...]:
    path = directory / filename
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return ()
    return _rules_of(path, mtime)


def match(rules: tuple[Rule, ...], relative: str, is_dir: bool) -> bool | None:
    """True: ignored; False: re-included by a `!` line; None: no line matches. The last matching line decides."""
    for rule in reversed(rules):
        if rule.dir_only and not is_dir:
            continue
        if rule.regex.match(relative):
            return not rule.negated
    return None


def is_ignored(path: Path, is_dir: bool, directories: list[Path]) -> bool:
    """Whether `path` is left out by the ignore files of `directories` (its ancestors, closest first)."""
    for filename in IGNORE_FILES:
        for directory in directories:
            decision = match(rules_in(directory, filename), path.relative_to(directory).as_posix(), is_dir)
            if decision is not None:
                return decision
    return False


def ancestors(start: Path, stop: Path | None) -> list[Path]:
    """`start` and its parents up to `stop` (included), closest first; `start` alone when `stop` is not above it."""
    chain = [start]
    if stop is None or stop == start or stop not in start.parents:
        return chain
    for parent in start.parents:
        chain.append(parent)
        if parent == stop:
            break
    return chain
