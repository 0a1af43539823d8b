"""Load a `.dstack.yml`: YAML with line numbers → `ServiceConfig`, or a `ConfigError` listing every problem."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from ray_dstack.config.errors import ConfigError, Problem
from ray_dstack.config.models.container import UNION_TAGS
from ray_dstack.config.models.groups import spelled_loc
from ray_dstack.config.models.service import PROBLEM_SEP, ServiceConfig, ignored_warning

Loc = tuple[Any, ...]


@dataclass
class LoadedService:
    """A validated service configuration with the warnings found while loading it."""

    config: ServiceConfig
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def name(self) -> str:
        assert self.config.name is not None
        return self.config.name


def name_from_filename(filename: str) -> str:
    """`serve.dstack.yml` → `serve`; any string → a valid Serve app name / URL segment."""
    base = Path(filename).name
    for suffix in (".dstack.yml", ".dstack.yaml", ".yml", ".yaml"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if not name:
        parent = Path(filename).resolve().parent.name if filename else ""
        name = re.sub(r"[^a-z0-9]+", "-", parent.lower()).strip("-")
    if not name:
        name = "service"
    if not name[0].isalpha():
        name = "svc-" + name
    return name[:41].rstrip("-")


MAX_EXPANDED_VALUES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values `node` stands for once its aliases are expanded (stops counting past the limit)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_EXPANDED_VALUES + 1  # an alias of a node still being counted: a cycle
    total = 1
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo)
        if total > MAX_EXPANDED_VALUES:
            break
    memo[key] = total
    return total


def _compose_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[Problem]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(Problem(_dotted(loc + (key,)), key_node.start_mark.line + 1, "Duplicate key"))
            seen.add(key)
            lines[loc + (key,)] = key_node.start_mark.line + 1
            _compose_lines(value_node, loc + (key,), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _compose_lines(item, loc + (i,), lines, problems)
            # `env: [K=V]` items are also addressable by their key, for env problems.
            if loc == ("env",) and isinstance(item, yaml.ScalarNode) and isinstance(item.value, str):
                lines.setdefault(("env", item.value.partition("=")[0].strip()), item.start_mark.line + 1)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_for(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        return f"Unknown field `{loc[-1]}`"
    if kind == "missing":
        return f"Field `{loc[-1]}` is required"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if kind in ("literal_error", "enum") and "input" in err:
        msg = f"{msg}, got {err['input']!r}"
    return msg


def _without_union_tags(loc: Loc) -> Loc:
    """`volumes[0].instance.path` → `volumes[0].path`: pydantic names the member of a tagged union it tried."""
    return tuple(part for i, part in enumerate(loc)
                 if not (part in UNION_TAGS and i > 0 and isinstance(loc[i - 1], int)))


def _problems_from_validation(exc: ValidationError, lines: Mapping[Loc, int], data: Any = None) -> list[Problem]:
    """One problem per error (and per `PROBLEM_SEP` part), its path spelled the way the file `data` spells it."""
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = _without_union_tags(tuple(err["loc"]))
        for text in _message({**err, "loc": spelled_loc(data, loc)}).split(PROBLEM_SEP):
            sub_loc = loc
            if text.startswith("@") and ":" in text:
                path, _, text = text[1:].partition(":")
                sub_loc = loc + tuple(int(part) if part.isdigit() else part for part in path.split("."))
            elif loc == ("env",) and (m := re.match(r"Environment variable (\w+) is not set", text)):
                sub_loc = ("env", m.group(1))
            sub_loc = spelled_loc(data, sub_loc)
            line = _line_for(sub_loc, lines)
            shown = sub_loc if sub_loc[:1] != ("env",) or len(sub_loc) < 2 else ("env",)
            problems.append(Problem(_dotted(shown), line, text))
    return problems


def parse_service(
    text: str,
    filename: str = ".dstack.yml",
    env_overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    name: str | None = None,
) -> LoadedService:
    """Parse and validate the text of a `service` configuration.

    `env_overrides` (CLI `-e K=V`) fill env placeholders first, then `environ` (default: `os.environ`).
    `name` overrides the file's `name`. Raises `ConfigError` with every problem found.
    """
    display = Path(filename).name if filename else "<config>"
    environ = os.environ if environ is None else environ
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        # Aliases can make a small file expand into billions of values ("billion laughs"): refuse it before
        # anything walks or prints the expanded data.
        if node is not None and _expanded_size(node, {}) > MAX_EXPANDED_VALUES:
            raise ConfigError(display, [Problem("", None, (
                f"The YAML expands to more than {MAX_EXPANDED_VALUES} values (nested anchors and aliases?)"))])
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(display, [Problem("", None, "Invalid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"Invalid YAML: {context + ', ' if context else ''}{problem}"
        raise ConfigError(display, [Problem("", line, message)]) from None

    lines: dict[Loc, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _compose_lines(node, (), lines, problems)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(display, [Problem("", _line_for((), lines), f"The file must be a YAML mapping, not {kind}")])
    if any(not isinstance(k, str) for k in data):
        bad = next(k for k in data if not isinstance(k, str))
        raise ConfigError(display, [Problem("", _line_for((), lines), f"Keys must be strings, got {bad!r}")])
    kind = data.get("type")
    if kind != "service":
        message = (
            "Field `type` is required and must be `service`"
            if kind is None
            else f"Only `type: service` is supported, got `{kind}`"
        )
        raise ConfigError(display, [Problem("type", _line_for(("type",), lines), message)])

    context = {"env_overrides": dict(env_overrides or {}), "environ": environ}
    try:
        config = ServiceConfig.model_validate(data, context=context)
    except ValidationError as exc:
        problems.extend(_problems_from_validation(exc, lines, data))
        config = None
    if problems:
        problems.sort(key=lambda p: (p.line or 0))
        raise ConfigError(display, problems)
    assert config is not None

    if name is not None:
        try:
            config = ServiceConfig.model_validate({**data, "name": name}, context=context)
        except ValidationError as exc:
            raise ConfigError(display, [Problem("name", None, _message(e)) for e in exc.errors()]) from None
    if config.name is None:
        config.name = name_from_filename(filename)
    warnings = [ignored_warning(f, f) for f in config.ignored_fields()]
    warnings.extend(config.group_warnings())
    return LoadedService(config=config, warnings=warnings, path=None)


def load_service(
    path: str | os.PathLike[str],
    env_overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    name: str | None = None,
) -> LoadedService:
    """Read, parse and validate a `.dstack.yml` file (see `parse_service`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [Problem("", None, "File not found")]) from None
    except IsADirectoryError:
        raise ConfigError(str(p), [Problem("", None, "Is a directory, not a file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(p), [Problem("", None, f"Cannot read file: {reason}")]) from None
    loaded = parse_service(text, str(p), env_overrides=env_overrides, environ=environ, name=name)
    loaded.path = p
    return loaded
