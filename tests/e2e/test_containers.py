"""`image` + `registry_auth` end to end on a local Ray through the console script, with real podman.

Images are built from this machine's files (tests/support/images.py: busybox for a shell and httpd; a Python
stdlib TGI-wire server as `text-generation-launcher`), pushed to a local registry that wants a password, and
deployed with `registry_auth`: two replicas on the same container port both serve; the password shows in no
output and no process's command line; a wrong password fails the deploy with the registry's reason and leaves
nothing; a failed redeploy keeps the previous version serving; `delete` leaves no container; the TGI-shaped
image with `format: tgi` answers the OpenAI SDK; the pull's progress shows in deploy's output.
The runtime flags podman needs on this machine reach the replicas through RAY_DSTACK_CONTAINER_FLAGS.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import CliCluster, free_port, ray_stop, wait_until, write_service
from tests.support import images

pytestmark = pytest.mark.slow

USER, PASSWORD = "deploybot", "reg-pw-Zq81-container-secret"
MODEL = "acme/tiny-tgi"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def registry():
    missing = images.missing_tools()
    assert not missing, f"the container tests need {missing} (.ci/run installs them with apt-get)"
    reg = images.Registry(USER, PASSWORD).start()
    t0 = time.monotonic()
    web_s = images.busybox_image("localhost/ray-dstack-test/web:1")
    tgi_s = images.tgi_image("localhost/ray-dstack-test/tgi:1")
    t1 = time.monotonic()
    reg.web = reg.push("localhost/ray-dstack-test/web:1", "acme/web:1")
    reg.tgi = reg.push("localhost/ray-dstack-test/tgi:1", "acme/tgi:1")
    print(f"\nimages built in {web_s:.2f}s (busybox) and {tgi_s:.2f}s (tgi, "
          f"{images.image_size_mb('localhost/ray-dstack-test/tgi:1'):.0f} MB), pushed in {time.monotonic() - t1:.2f}s")
    # The replicas must pull through the registry, not find the images already on the node.
    for ref in (reg.web, reg.tgi):
        images.podman("rmi", "-f", ref, check=False)
    yield reg
    reg.stop()
    assert t0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, registry):
    base = tmp_path_factory.mktemp("containers")
    env = images.cluster_env(base)
    ray_stop(env)
    c = CliCluster(env=env, http_port=free_port(), home=base / "home")
    c.base = base
    yield c
    ray_stop(env)
    leftover = containers()
    assert not leftover, f"containers left after ray stop: {leftover}"


def containers(service: str | None = None) -> list[str]:
    label = f"ray-dstack.service={service}" if service else "ray-dstack.owner"
    out = images.podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}").stdout
    return out.split()


def command_lines() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def no_password(text: str, where: str) -> None:
    assert PASSWORD not in text and PASSWORD[-10:] not in text, f"{where} shows the registry password"


def web_service(image: str, name: str, password: str = PASSWORD) -> str:
    return f"""
type: service
name: {name}
image: {image}
registry_auth:
  username: {USER}
  password: {password}
env:
  GREETING: hello-from-env
commands:
  - mkdir -p /www
  - echo "$GREETING $(hostname)" > /www/index.html
  - exec httpd -f -p 8000 -h /www
port: 8000
replicas: 2
auth: false
"""


def test_private_image_two_replicas_on_one_port_and_nothing_left(cluster, registry, tmp_path):
    path = write_service(tmp_path, "web", web_service(registry.web, "web"))
    plan = cluster.run("plan", str(path), check=True)
    assert "podman run --name 'web-<replica>'" in plan.stdout and "password ***" in plan.stdout
    no_password(plan.stdout + plan.stderr, "plan")

    t0 = time.monotonic()
    deploy = cluster.run("deploy", str(path), timeout=300)
    print(f"\ndeploy of 2 container replicas (pull included): {time.monotonic() - t0:.1f}s")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    no_password(deploy.stdout + deploy.stderr, "deploy")
    no_password(command_lines(), "a process's command line")
    assert len(containers("web")) == 2
    # The pull's progress reaches deploy's own progress lines (ray_dstack/serve/runtime/pull_progress.py).
    assert f"pulling {registry.web} on {socket.gethostname()}: " in deploy.stderr, deploy.stderr

    # Both replicas serve, each from its own container (its own hostname) on container port 8000.
    seen = set()

    def both_answer():
        seen.add(httpx.get(f"{cluster.http}/web/", timeout=10).text.strip())
        return len(seen) >= 2

    wait_until(both_answer, timeout=60, interval=0.05, what="answers from both containers")
    assert all(s.startswith("hello-from-env ") for s in seen), seen

    status = cluster.run("status", "web", "--json", check=True)
    no_password(status.stdout + status.stderr, "status --json")
    logs = cluster.run("logs", "web")
    no_password(logs.stdout + logs.stderr, "logs")
    assert "pulling image" in logs.stdout + logs.stderr

    delete = cluster.run("delete", "web", check=True)
    no_password(delete.stdout + delete.stderr, "delete")
    wait_until(lambda: not containers("web"), timeout=60, interval=0.5, what="the containers to be removed")
    assert not list(Path(tempfile.gettempdir()).glob("ray-dstack-ctr-*")), "an env file directory was left"


def test_wrong_password_fails_the_deploy_and_leaves_nothing(cluster, registry, tmp_path):
    wrong = "not-the-password-4711"
    path = write_service(tmp_path, "webbad", web_service(registry.web, "webbad", password=wrong))
    images.podman("rmi", "-f", registry.web, check=False)  # a cached image must not hide the wrong password
    deploy = cluster.run("deploy", str(path), "--timeout", "120", timeout=300)
    out = deploy.stdout + deploy.stderr
    assert deploy.returncode != 0, out
    assert "unauthorized" in out.lower() and "Nothing was left deployed" in out, out
    assert wrong not in out
    listed = cluster.run("list")
    assert "webbad" not in listed.stdout
    assert not containers("webbad")


def test_failed_redeploy_keeps_the_previous_version_serving(cluster, registry, tmp_path):
    """A redeploy whose pull fails (wrong password) fails with the registry's reason; the running version keeps
    answering throughout, gets back its replicas, and no container of the failed version is left."""
    first = write_service(tmp_path, "keep", web_service(registry.web, "keep"))
    deploy = cluster.run("deploy", str(first), timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    answers: list[int | str] = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            try:
                answers.append(httpx.get(f"{cluster.http}/keep/", timeout=10).status_code)
            except httpx.HTTPError as exc:
                answers.append(repr(exc))
            stop.wait(0.2)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    wrong = "not-the-password-0815"
    (tmp_path / "v2").mkdir()
    second = write_service(tmp_path / "v2", "keep", web_service(registry.web, "keep", password=wrong))
    t0 = time.monotonic()
    redeploy = cluster.run("deploy", str(second), "--timeout", "60", timeout=200)
    out = redeploy.stdout + redeploy.stderr
    failed_s = time.monotonic() - t0
    assert redeploy.returncode != 0, out
    assert "unauthorized" in out.lower() and "The previous version keeps serving" in out, out
    assert wrong not in out and PASSWORD not in out

    def first_version_whole():
        status = cluster.status("keep")
        return status["replicas"]["running"] == 2 and status["status"] == "RUNNING" and len(containers("keep")) == 2

    t0 = time.monotonic()
    wait_until(first_version_whole, timeout=60, interval=1, what="the first version's 2 replicas and containers")
    print(f"\nfailed redeploy: {failed_s:.1f}s; the first version whole again {time.monotonic() - t0:.1f}s later")
    stop.set()
    asker.join(timeout=15)
    assert answers and all(a == 200 for a in answers), f"the first version stopped answering: {answers}"
    assert httpx.get(f"{cluster.http}/keep/", timeout=10).text.startswith("hello-from-env ")
    cluster.run("delete", "keep", check=True)
    wait_until(lambda: not containers("keep"), timeout=60, interval=0.5, what="the containers to be removed")


def test_tgi_image_answers_the_openai_sdk(cluster, registry, tmp_path):
    text = f"""
type: service
name: tgi
image: {registry.tgi}
registry_auth: {{username: {USER}, password: {PASSWORD}}}
env: {{TGI_GREETING: from-the-image}}
commands:
  - text-generation-launcher --model-id {MODEL} --port 8000
port: 8000
auth: false
model:
  name: {MODEL}
  format: tgi
  chat_template: "{TEMPLATE}"
  eos_token: "</s>"
"""
    path = write_service(tmp_path, "tgi", text)
    deploy = cluster.run("deploy", str(path), timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    no_password(deploy.stdout + deploy.stderr, "deploy")
    client = openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert answer.choices[0].message.content == "from-the-image w0 w1 "
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 4 and "".join(pieces) == "from-the-image w0 w1 w2 "
    cluster.run("delete", "tgi", check=True)
    wait_until(lambda: not containers("tgi"), timeout=60, interval=0.5, what="the TGI container to be removed")
