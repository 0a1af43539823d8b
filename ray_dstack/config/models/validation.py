"""Helpers shared by the config models: multi-problem errors with their own field paths, value parsers."""

from __future__ import annotations

from typing import Any, Optional

# A validator that finds several problems joins them with PROBLEM_SEP; a problem may name its own field
# path as `@path:message` (model validators have no field location). The loader splits them again.
# A path is dotted, list indices as digits: `groups.1.replicas`.
PROBLEM_SEP = "\x1e"

PYTHON_VERSIONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")


def at(path: str, message: str) -> str:
    """A problem that names its own field path, relative to where the validator runs."""
    return f"@{path}:{message}"


def parse_python_version(value: Any) -> Any:
    """`python: 3.11` (a YAML float) or `"3.11"`; the float `3.1` is read as `3.10`."""
    if isinstance(value, float):
        value = "3.10" if value == 3.1 else str(value)
    if isinstance(value, str) and value not in PYTHON_VERSIONS:
        raise ValueError(f"Unsupported python version `{value}` (use one of {', '.join(PYTHON_VERSIONS)})")
    return value


def check_image_ref(value: Optional[str]) -> Optional[str]:
    if value is not None and (not value.strip() or any(ch.isspace() for ch in value)):
        raise ValueError(f"Invalid image `{value}`: expected a reference such as `ghcr.io/org/name:tag`")
    return value


def parse_lines(value: Any) -> Any:
    """`commands: "one line"` means `commands: ["one line"]`."""
    return [value] if isinstance(value, str) else value
