"""Helpers for the config/plan tests (not a conftest: shared fixtures live elsewhere)."""

from __future__ import annotations

import textwrap

import pytest

from ray_dstack.config import ConfigError, LoadedService, parse_service

BASE = "type: service\ncommands: [python3 -m http.server]\nport: 8000\n"


def load(text: str, environ: dict[str, str] | None = None, **kw) -> LoadedService:
    return parse_service(textwrap.dedent(text), "serve.dstack.yml", environ=environ or {}, **kw)


def errors(text: str, environ: dict[str, str] | None = None, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, environ, **kw)
    return info.value
