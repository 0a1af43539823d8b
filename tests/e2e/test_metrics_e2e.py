"""ray-dstack's request metrics reach Prometheus through Ray's metrics export, with sane values.

Deploys the local-chat demo (llama.cpp + SmolLM2-135M-Instruct), sends streamed and plain requests through `/v1` and
`/local-chat/v1` plus a few 4xx, then scrapes the head node's metrics export port (from the dashboard's node
list) until the counters match what was sent.
"""

from __future__ import annotations


import httpx
import pytest

pytestmark = pytest.mark.slow

import llama_cpp  # noqa: F401 - the test extra installs the local backend
import openai
from tests.support.prom import metrics_url, scrape, total

TOKEN = "metrics-token-0123456789"
MODEL = "smollm2-135m"  # configs/local-chat.dstack.yml
SERVICE = "local-chat"
CHAT = "chat/completions"
PROMPT = [{"role": "user", "content": "Name a colour."}]


def test_metrics_count_what_was_sent(cli_cluster):
    proc = cli_cluster.run("deploy", "configs/local-chat.dstack.yml", "--token", TOKEN, timeout=400)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    http = cli_cluster.http

    expected_tokens = 0
    stream_count = 0
    # Through the gateway: 2 plain, 2 streamed.
    gw = openai.OpenAI(base_url=f"{http}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=f"{http}/{SERVICE}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    with gw, direct:
        for _ in range(2):
            r = gw.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=6)
            expected_tokens += r.usage.completion_tokens
        for client in (gw, gw, direct):
            chunks = [c for c in client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=6, stream=True)]
            expected_tokens += sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
            stream_count += 1
    # 4xx: wrong token at the gateway (401, known model), unknown model at the gateway (404, no service tag),
    # unknown model at the service (404, service-tagged).
    bad = httpx.post(f"{http}/v1/chat/completions", json={"model": MODEL, "messages": PROMPT},
                     headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert bad.status_code == 401
    unknown = httpx.post(f"{http}/v1/chat/completions", json={"model": "no-such-model", "messages": PROMPT},
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert unknown.status_code == 404
    wrong = httpx.post(f"{http}/{SERVICE}/v1/chat/completions", json={"model": "no-such-model", "messages": PROMPT},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert wrong.status_code == 404

    url = metrics_url()
    tags = {"service": SERVICE, "model": MODEL, "route": CHAT}

    def settled():
        s = scrape(url)
        ok = (
            total(s, "ray_dstack_requests_total", status="200", **tags) == 5
            and total(s, "ray_dstack_requests_total", status="401", **tags) == 1
            and total(s, "ray_dstack_requests_total", status="404", service="", model="", route=CHAT) == 1
            and total(s, "ray_dstack_requests_total", status="404", **tags) == 1
            and total(s, "ray_dstack_time_to_first_token_s_count", **tags) == stream_count
        )
        return s if ok else None

    # Ray exports custom metrics every few seconds.
    s = cli_cluster.wait_until(settled, timeout=90, interval=3, what="ray-dstack metrics in Prometheus")

    latency_count = total(s, "ray_dstack_request_latency_s_count", status="200", **tags)
    latency_sum = total(s, "ray_dstack_request_latency_s_sum", status="200", **tags)
    ttft_sum = total(s, "ray_dstack_time_to_first_token_s_sum", **tags)
    assert latency_count == 5
    assert latency_sum > 0
    assert 0 < ttft_sum <= latency_sum
    # Each stream's TTFT is at most its own latency, so the +Inf buckets agree too.
    assert total(s, "ray_dstack_request_latency_s_bucket", le="+Inf", status="200", **tags) == 5
    tokens = total(s, "ray_dstack_output_tokens_total", **tags)
    # Streams count SSE events: a final finish-only event per stream may add one.
    assert expected_tokens <= tokens <= expected_tokens + stream_count, (tokens, expected_tokens)
    assert total(s, "ray_dstack_output_tokens_per_s_count", **tags) >= 1
    assert total(s, "ray_dstack_output_tokens_per_s_sum", **tags) > 0
    assert total(s, "ray_dstack_inflight_streams", **tags) == 0
    # Serve's own metrics are on the same endpoint (exported on their own interval, so wait for them too).
    cli_cluster.wait_until(lambda: "ray_serve_num_http_requests" in httpx.get(url, timeout=10).text,
                           timeout=90, interval=3, what="Serve's own metrics on the same endpoint")
