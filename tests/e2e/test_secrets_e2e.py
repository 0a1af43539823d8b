"""Secrets never leak, token checks are constant-time, and one service's token does not open another.

Two `format: tgi` services (backend: tests/apps/faulty_server.py) are deployed through the console script on
a real local Ray. Service A carries every kind of secret: its `--token`, `registry_auth.password`, `HF_TOKEN`
and other env values whose names mark them secret (`*TOKEN*`, `*KEY*`, `*SECRET*`, `*PASSWORD*`,
`*CREDENTIAL*`). Every output of `plan`, `deploy`, `status` (also `--json`: the Serve controller's view),
`list`, `logs` and of failing commands is grepped for each secret.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys

import httpx
import pytest

from conftest import write_service
from ray_dstack.deploy.dashboard import DashboardClient
from ray_dstack.spec import AuthSpec, token_digest
from tests.apps.faulty_server import chat, service_yaml

TOKEN_A = "tok-A-s3cr3t-0123456789abcdefghij"
TOKEN_B = "tok-B-s3cr3t-9876543210zyxwvutsrq"
HF = "hf_leakcheck_ABCDEFGHIJKLMNOP123456"
API_KEY = "sk-leakcheck-api-key-777777"
DB_PASSWORD = "pw-leakcheck-hunter2-888888"
REGISTRY_PASSWORD = "reg-leakcheck-passw0rd-999999"
FROM_CLI = "cli-leakcheck-secret-555555"
SECRETS = [TOKEN_A, TOKEN_B, HF, API_KEY, DB_PASSWORD, REGISTRY_PASSWORD, FROM_CLI]
MODEL_A, MODEL_B = "acme/model-a", "acme/model-b"


def service_a() -> str:
    env = {"HF_TOKEN": HF, "OPENAI_API_KEY": API_KEY, "DB_PASSWORD": DB_PASSWORD, "PLAIN": "visible-value"}
    text = service_yaml("svc-a", model=MODEL_A, env=env)
    # registry_auth is accepted (and reported as not honoured on Ray); its password must never show.
    return text + f"registry_auth:\n  username: bot\n  password: {REGISTRY_PASSWORD}\n"


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a secret ({secret[:8]}...):\n{text[:3000]}"
    # Not even a recognisable piece of one.
    for secret in SECRETS:
        assert secret[-12:] not in text, f"{where} shows part of a secret"


def all_output(proc) -> str:
    return proc.stdout + "\n" + proc.stderr


# --- no cluster needed ----------------------------------------------------------------------------------


def test_plan_redacts_every_secret(tmp_path):
    from conftest import BIN

    path = write_service(tmp_path, "svc-a", service_a().replace("  - PLAIN=visible-value\n",
                                                                "  - PLAIN=visible-value\n  - MY_SECRET\n"))
    import subprocess

    for extra in ([], ["--json"]):
        proc = subprocess.run([str(BIN / "ray-dstack"), "plan", str(path), "-e", f"MY_SECRET={FROM_CLI}", *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert_no_secret(all_output(proc), f"plan {' '.join(extra)}")
        assert "visible-value" in proc.stdout  # non-secret values are shown: the redaction is targeted
        assert "***" in proc.stdout


def test_config_errors_do_not_echo_secret_values(tmp_path):
    import subprocess

    from conftest import BIN

    bad = service_a() + "replicas: lots\n"
    bad = bad.replace(f"password: {REGISTRY_PASSWORD}", f"password: [{REGISTRY_PASSWORD}]")
    bad = bad.replace(f"OPENAI_API_KEY={API_KEY}", f"OPENAI_API_KEY={API_KEY}\n  - 1NOT-A-KEY={DB_PASSWORD}x")
    path = write_service(tmp_path, "svc-a", bad)
    proc = subprocess.run([str(BIN / "ray-dstack"), "plan", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "replicas" in proc.stderr and "registry_auth.password" in proc.stderr, proc.stderr
    assert_no_secret(all_output(proc), "plan of an invalid file")


def test_token_comparison_is_constant_time_on_digests():
    source = inspect.getsource(AuthSpec.accepts)
    assert "hmac.compare_digest(token_digest(" in source
    assert "token_sha256" in source and "==" not in source.replace("!=", "")
    spec = AuthSpec(token_sha256=token_digest(TOKEN_A))
    assert spec.accepts(f"Bearer {TOKEN_A}") and spec.accepts(f"bearer   {TOKEN_A}  ")
    for wrong in (None, "", TOKEN_A, f"Basic {TOKEN_A}", f"Bearer {TOKEN_B}", f"Bearer {TOKEN_A[:-1]}",
                  f"Bearer {token_digest(TOKEN_A)}", "Bearer ", f"Bearer {TOKEN_A}\x00"):
        assert not spec.accepts(wrong), wrong
    # Only the digest is kept: the spec that travels to Serve has no clear-text token.
    assert TOKEN_A not in spec.model_dump_json()
    assert spec.token_sha256 == hashlib.sha256(TOKEN_A.encode()).hexdigest()


# --- on a cluster ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(cli_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secrets")
    path_a = write_service(tmp, "svc-a", service_a())
    proc = cli_cluster.run("deploy", str(path_a), "--token", TOKEN_A, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    outputs = {"deploy svc-a": all_output(proc)}
    path_b = write_service(tmp, "svc-b", service_yaml("svc-b", model=MODEL_B))
    env = dict(cli_cluster.env, RAY_DSTACK_TOKEN=TOKEN_B)
    import subprocess

    from conftest import BIN, REPO

    proc = subprocess.run([str(BIN / "ray-dstack"), "deploy", str(path_b), "--http-port", str(cli_cluster.http_port)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    outputs["deploy svc-b"] = all_output(proc)
    cli_cluster.outputs = outputs
    cli_cluster.tmp = tmp
    return cli_cluster


@pytest.mark.slow
def test_no_command_output_shows_a_secret(deployed):
    outputs = dict(deployed.outputs)
    # Some traffic first, so the logs have something to say (including failures and 401s).
    with httpx.Client(trust_env=False) as client:
        assert chat(client, f"{deployed.http}/v1", TOKEN_A, MODEL_A, "hello", stream=True).ok
        assert chat(client, f"{deployed.http}/v1", TOKEN_A, MODEL_A, "[[garbage]]", stream=False).status == 502
        bad = client.get(f"{deployed.http}/svc-a/stats", headers={"Authorization": f"Bearer {TOKEN_B}"})
        assert bad.status_code == 401
        outputs["401 body"] = bad.text
    for args in (["status"], ["status", "--json"], ["status", "svc-a", "--json"], ["list"], ["list", "--json"],
                 ["logs", "svc-a", "-n", "5000"], ["logs", "svc-b", "-n", "5000"], ["status", "nope"],
                 ["logs", "nope"], ["delete", "nope"]):
        proc = deployed.run(*args, timeout=120)
        outputs[" ".join(args)] = all_output(proc)
    assert "service commands started" in outputs["logs svc-a -n 5000"]
    # A redeploy that fails, with the secrets in its env and on its command line.
    broken = service_a().replace("  - exec ", "  - echo starting >&2\n  - exit 4\n  - exec ")
    path = write_service(deployed.tmp, "svc-a", broken)
    proc = deployed.run("deploy", str(path), "--token", TOKEN_A, "--timeout", "120", timeout=240)
    assert proc.returncode == 1 and "exited with code 4" in proc.stderr, proc.stderr
    outputs["failed deploy"] = all_output(proc)
    for where, text in outputs.items():
        assert_no_secret(text, where)
    # The Serve controller's view keeps only the token's digest.
    with DashboardClient("http://127.0.0.1:8265") as dashboard:
        details = dashboard.serve_details()
    cfg = json.dumps(details)
    assert TOKEN_A not in cfg and TOKEN_B not in cfg and REGISTRY_PASSWORD not in cfg
    assert token_digest(TOKEN_A) in cfg


@pytest.mark.slow
def test_a_token_for_one_service_does_not_open_another(deployed):
    with httpx.Client(trust_env=False) as client:
        # The previous test's failed redeploy of svc-a was rolled back: wait for it to answer again.
        deployed.wait_until(
            lambda: client.get(f"{deployed.http}/svc-a/stats", headers={"Authorization": f"Bearer {TOKEN_A}"},
                               timeout=10).status_code == 200,
            timeout=120, what="svc-a to serve again after the rollback",
        )
        # Each token opens its own service ...
        assert client.get(f"{deployed.http}/svc-a/stats", headers={"Authorization": f"Bearer {TOKEN_A}"}).status_code == 200
        assert client.get(f"{deployed.http}/svc-b/stats", headers={"Authorization": f"Bearer {TOKEN_B}"}).status_code == 200
        # ... and not the other one, on its own route ...
        for path, token in (("svc-b", TOKEN_A), ("svc-a", TOKEN_B)):
            r = client.get(f"{deployed.http}/{path}/stats", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, (path, r.status_code, r.text)
            r = client.post(f"{deployed.http}/{path}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                            json={"model": MODEL_B if path == "svc-b" else MODEL_A,
                                  "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 401, (path, r.status_code, r.text)
        # ... nor through /v1 with the other service's model, streaming or not.
        for token, model in ((TOKEN_A, MODEL_B), (TOKEN_B, MODEL_A)):
            for stream in (False, True):
                o = chat(client, f"{deployed.http}/v1", token, model, "hi", stream=stream)
                assert o.status == 401, o
            r = client.post(f"{deployed.http}/v1/completions", headers={"Authorization": f"Bearer {token}"},
                            json={"model": model, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 401, r.text
        assert chat(client, f"{deployed.http}/v1", TOKEN_A, MODEL_A, "hi", stream=False).ok
        assert chat(client, f"{deployed.http}/v1", TOKEN_B, MODEL_B, "hi", stream=True).ok
        # /v1/models lists only what the token opens.
        for token, model in ((TOKEN_A, MODEL_A), (TOKEN_B, MODEL_B)):
            r = client.get(f"{deployed.http}/v1/models", headers={"Authorization": f"Bearer {token}"})
            assert [m["id"] for m in r.json()["data"]] == [model]
        assert client.get(f"{deployed.http}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.slow
def test_the_replicas_own_http_ports_check_the_token_too(deployed):
    """On ray-dstack's data path (HAProxy, direct ingress) every replica also listens on an HTTP port of its
    own (30000-31000), which HAProxy forwards to. The replica checks the token there exactly as behind
    Serve's HTTP address."""
    with DashboardClient("http://127.0.0.1:8265") as dashboard:
        app = dashboard.serve_details()["applications"]["svc-a"]
    pids = [r["pid"] for d in app["deployments"].values() for r in d["replicas"] if r.get("pid")]
    assert pids
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    ports = {
        port
        for line in listening
        if any(f"pid={pid}," in line for pid in pids)
        and 30000 <= (port := int(line.split()[3].rsplit(":", 1)[1])) <= 31000
    }
    assert ports, "no direct-ingress port on svc-a's replica: is the local cluster on ray-dstack's data path?"
    with httpx.Client(trust_env=False, timeout=10) as client:
        for port in ports:
            url = f"http://127.0.0.1:{port}/svc-a/stats"
            assert client.get(url).status_code == 401
            assert client.get(url, headers={"Authorization": f"Bearer {TOKEN_B}"}).status_code == 401
            assert client.get(url, headers={"Authorization": f"Bearer {TOKEN_A}"}).status_code == 200


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
