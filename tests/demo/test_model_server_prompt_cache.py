"""The demo model server's `--prompt-cache-mb`: llama-cpp-python's RAM cache of earlier prompts, so a
conversation's next turn starts from its own cached state even after another conversation ran in between (what
bench/prefix_cache.py measures routing with: a cache of the last prompt only would hide the effect of routing).
A process of its own on a free loopback port, no Ray; `--verbose` makes llama-cpp-python log its cache hits.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import free_port, wait_until
from ray_dstack.demo.model_server import packaged_model

packaged_model()

MODEL = "smollm2-135m"


def system_prompt(topic: str) -> str:
    return f"You answer questions about {topic}. " + " ".join(f"{topic} fact number {i}." for i in range(40))


def test_a_conversation_resumes_from_its_cached_prefix_after_another_one_ran(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ray_dstack.demo.model_server", "serve", "--port", str(port),
                                 "--alias", MODEL, "--n-threads", "1", "--prompt-cache-mb", "1024", "--verbose"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or httpx.get(f"{url}/health").status_code == 200, timeout=120,
                   interval=0.1, what="the demo server's /health")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert "a RAM cache of 1024 MiB" in log.read_text()

        def turn(messages: list[dict]) -> str:
            resp = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                              json={"model": MODEL, "messages": messages, "max_tokens": 4})
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["message"]["content"]

        rivers = [{"role": "system", "content": system_prompt("rivers")}, {"role": "user", "content": "Hello"}]
        stones = [{"role": "system", "content": system_prompt("stones")}, {"role": "user", "content": "Hello"}]
        rivers.append({"role": "assistant", "content": turn(rivers)})
        turn(stones)  # the context now holds the stones conversation
        hits_before = log.read_text().count("cache hit")
        rivers.append({"role": "user", "content": "Tell me more."})
        turn(rivers)
        assert log.read_text().count("cache hit") == hits_before + 1
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("value", ["-1", "-512"])
def test_a_negative_cache_size_is_refused_naming_the_option(value):
    proc = subprocess.run([sys.executable, "-m", "ray_dstack.demo.model_server", "serve", "--prompt-cache-mb", value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"--prompt-cache-mb {value}: expected a size in MiB" in proc.stderr
    assert "Traceback" not in proc.stderr
