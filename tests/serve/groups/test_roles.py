"""The paths a router group's replica takes from clients: dstack's whitelist (`proxy/lib/const.py`): exact
`/generate`, prefix `/v1/`, exact `/chat/completions`; the router's admin API is never public."""

from __future__ import annotations

import httpx
import pytest

from ray_dstack.serve.groups.roles import router_allows

ALLOWED = ["/generate", "/chat/completions", "/v1/chat/completions", "/v1/completions", "/v1/models?x=1",
           "/generate?stream=true", "/v1/"]
REFUSED = ["/workers", "/workers/abc", "/health", "/metrics", "/", "/v1", "/generatex", "/generate/",
           "/chat/completions/x", "/chat/completionsx", "/v1x/models", "/flush_cache", "/get_loads", "",
           "/workers?x=/v1/", "/health?/generate"]


@pytest.mark.parametrize("path", ALLOWED)
def test_router_allows_the_public_paths(path):
    assert router_allows(path) is True


@pytest.mark.parametrize("path", REFUSED)
def test_router_refuses_everything_else(path):
    assert router_allows(path) is False


def test_the_query_string_does_not_decide():
    assert router_allows("/generate?x=/workers") and not router_allows("/workers?path=/generate")


@pytest.mark.parametrize("path", ["/v1/../workers", "/v1/../workers/abc", "/v1/./../health",
                                  "/v1/chat/../../workers"])
def test_a_path_that_the_forwarder_normalizes_is_judged_as_forwarded(path):
    forwarded = httpx.AsyncClient(base_url="http://127.0.0.1:1").build_request("GET", path).url.path
    assert router_allows(path) == router_allows(forwarded), (path, forwarded)


@pytest.mark.parametrize("path", ["/v1/%2e%2e/workers", "/v1/%2E%2E/health", "/v1%2f..%2fworkers", "/v1/./models"])
def test_percent_encoded_and_single_dot_segments_are_refused(path):
    assert router_allows(path) is False
