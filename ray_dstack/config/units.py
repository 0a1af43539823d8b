"""Shorthand parsers shared by the models: ranges (`a..b`), memory sizes (`24GB`), durations (`5m`)."""

from __future__ import annotations

import re
from typing import Any, Callable

_MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(mb|gb|tb)?$")
_MEMORY_FACTOR = {"mb": 1 / 1024, "gb": 1.0, "tb": 1024.0, None: 1.0}
_DURATION_RE = re.compile(r"^([0-9]+)\s*([smhdw])$")
MAX_DURATION_S = 10**10  # ~300 years: anything longer is a typo (and overflows a float)
_DURATION_FACTOR = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_memory(value: Any) -> float:
    """A size in GB: `512MB` → 0.5, `24GB` → 24, `1TB` → 1024, a bare number is GB. Case/spaces ignored."""
    if isinstance(value, bool):
        raise ValueError(f"Invalid memory size: {value!r}")
    if isinstance(value, (int, float)):
        size = float(value)
    elif isinstance(value, str):
        m = _MEMORY_RE.match(value.strip().lower().replace(" ", ""))
        if m is None:
            raise ValueError(f"Invalid memory size `{value}` (expected e.g. `512MB`, `24GB`, `1TB`)")
        size = float(m.group(1)) * _MEMORY_FACTOR[m.group(2)]
    else:
        raise ValueError(f"Invalid memory size: {value!r}")
    if size != size or size in (float("inf"), float("-inf")):
        raise ValueError(f"Invalid memory size: {value!r}")
    if size < 0:
        raise ValueError(f"Memory size must not be negative: {value!r}")
    return size


def parse_duration(value: Any) -> int:
    """Seconds: an int or digit string is seconds, else `<n><unit>` with units s, m, h, d, w."""
    if isinstance(value, bool):
        raise ValueError(f"Invalid duration: {value!r}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            seconds = int(text)
        else:
            m = _DURATION_RE.match(text)
            if m is None:
                raise ValueError(f"Invalid duration `{value}` (expected seconds or e.g. `30s`, `5m`, `1h`)")
            seconds = int(m.group(1)) * _DURATION_FACTOR[m.group(2)]
    else:
        raise ValueError(f"Invalid duration: {value!r}")
    if seconds < 0:
        raise ValueError(f"Duration must not be negative: {value!r}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"Duration too long: {value!r}")
    return seconds


def parse_range(value: Any, parse_one: Callable[[Any], Any]) -> dict[str, Any]:
    """`a..b`, `a..`, `..b` or a single value (min = max) → `{min, max}`; mappings pass through."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and ".." in value:
        low, _, high = value.partition("..")
        low, high = low.strip(), high.strip()
        if not low and not high:
            raise ValueError("Invalid empty range: `..`")
        return {
            "min": parse_one(low) if low else None,
            "max": parse_one(high) if high else None,
        }
    one = parse_one(value.strip() if isinstance(value, str) else value)
    return {"min": one, "max": one}


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"Expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        return int(value)
    raise ValueError(f"Expected an integer, got {value!r}")


def format_memory(gb: float) -> str:
    if gb < 1:
        return f"{gb * 1024:g}MB"
    return f"{gb:g}GB"
