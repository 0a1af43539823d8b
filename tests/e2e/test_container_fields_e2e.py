"""dstack's container and service fields end to end on a local Ray, through the console script: one cluster.

- a process replica pair (`$RAY_DSTACK_PORT`, two replicas on one node) with a node directory and a named
  volume (a model cache both replicas share: each finds what the other wrote), `files` (a directory at an
  absolute path, a file at a relative one), a git `repos` entry cloned from a local bare repository,
  `shell: sh`, `strip_prefix: false` and `dstack: true` (the commands reach the dashboard); a redeploy with a
  changed file rolls the service and the new content is served;
- a container replica (busybox) with a volume, an uploaded file, a local `repos` directory, `user`,
  `privileged`, `shell` and `working_dir`;
- `schedule` (every minute: deploy leaves 0 replicas and `status` names the next start, which then comes) and
  `max_duration` (the service goes back to 0 replicas once it elapsed);
- `docker: true`: the commands run `docker ps` against a working daemon;
- a file over the upload limit fails `plan` and `deploy` naming it, and nothing is deployed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import CliCluster, free_port, ray_stop, wait_until
from tests.support import images

pytestmark = pytest.mark.slow

REPORT_PY = r'''
import json, os, sys, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def read(path):
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        return f"<{type(exc).__name__}>"

def dashboard():
    url = os.environ.get("RAY_DSTACK_ADDRESS")
    if not url:
        return None
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:  # reached; a cluster with token auth wants the token (none is given)
        return exc.code
    except OSError as exc:
        return str(exc)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        cache = "/root/.cache/test-hf"
        body = json.dumps({
            "path": self.path, "replica": os.environ["REPLICA_ID"], "cwd": os.getcwd(),
            "shell": read("shell.txt"), "conf": read("conf.txt"), "app": read("/opt/app/VERSION"),
            "repo": read("src/README.md"), "node_dir": sorted(os.listdir("/srv/node-dir")),
            "cache": sorted(os.listdir(cache)), "dashboard": dashboard(),
            "ray_address": os.environ.get("RAY_API_SERVER_ADDRESS"),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = images.missing_tools()
    assert not missing, f"these tests need {missing} (.ci/run installs them with apt-get)"
    base = tmp_path_factory.mktemp("fields")
    # The nodes' volume root (cluster.yaml would point it at shared storage): the local head inherits it.
    env = images.cluster_env(base, RAY_DSTACK_VOLUME_ROOT=str(base / "volumes"))
    ray_stop(env)
    c = CliCluster(env=env, http_port=free_port(), home=base / "home")
    c.base = base
    yield c
    ray_stop(env)


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"})


def bare_repo(base: Path) -> Path:
    work, bare = base / "repo-work", base / "repo.git"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "README.md").write_text("cloned from the bare repo\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=base)
    return bare


def project(base: Path) -> Path:
    """A directory like a user's: the config, an `app/` directory, a file, and what .gitignore keeps out."""
    root = base / "project"
    (root / "app").mkdir(parents=True)
    (root / "app" / "report.py").write_text(REPORT_PY)
    (root / "app" / "VERSION").write_text("app v1\n")
    (root / "app" / "scratch.log").write_text("not uploaded\n")
    (root / "app" / ".gitignore").write_text("*.log\n")
    (root / "conf.txt").write_text("conf v1\n")
    node_dir(base)
    return root


def node_dir(base: Path) -> Path:
    """A directory of the node with one file, for `volumes` (each test that mounts it makes sure it is there)."""
    path = base / "node-dir"
    path.mkdir(exist_ok=True)
    (path / "from-the-node").write_text("x")
    return path


def process_service(base: Path, bare: Path) -> str:
    return f"""type: service
name: fields-proc
port: 8000
replicas: 2
auth: false
strip_prefix: false
dstack: true
shell: sh
volumes:
  - {base}/node-dir:/srv/node-dir
  - test-hf:/root/.cache/test-hf
files:
  - app:/opt/app
  - conf.txt
repos:
  - {{url: "file://{bare}", branch: main, path: src}}
commands:
  - readlink /proc/$$/exe > shell.txt
  - export REPLICA_ID=$(cat /proc/sys/kernel/random/uuid)
  - touch /root/.cache/test-hf/$REPLICA_ID
  - python3 /opt/app/report.py $RAY_DSTACK_PORT
"""


def reports(c: CliCluster, n: int = 12) -> dict[str, dict]:
    """The replicas' reports by replica id, from `n` requests through Serve's front end."""
    seen: dict[str, dict] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            resp = client.get(f"{c.http}/fields-proc/some/path?q=1")
            resp.raise_for_status()
            report = resp.json()
            seen[report["replica"]] = report
    return seen


def test_process_replicas_get_volumes_files_repo_shell_and_the_full_path(cluster):
    c = cluster
    root = project(c.base)
    bare = bare_repo(c.base)
    path = root / "fields-proc.dstack.yml"
    path.write_text(process_service(c.base, bare))
    plan = c.run("plan", str(path), check=True).stdout
    assert "volume: test-hf at /root/.cache/test-hf" in plan and "files: app → /opt/app" in plan, plan
    c.run("deploy", str(path), timeout=600, check=True)
    both = wait_until(lambda: len(r := reports(c)) == 2 and r, timeout=60, interval=1, what="both replicas")
    for report in both.values():
        assert report["path"] == "/fields-proc/some/path?q=1"  # strip_prefix: false
        assert report["shell"].endswith("dash") or report["shell"].endswith("/sh"), report["shell"]
        assert (report["conf"], report["app"], report["repo"]) == ("conf v1", "app v1", "cloned from the bare repo")
        assert report["node_dir"] == ["from-the-node"]
        # The named volume is one directory of the node: each replica finds what the other wrote.
        assert set(both) <= set(report["cache"]), report["cache"]
        # dstack: true: the dashboard answers (401 on a cluster with Ray's token auth: no credentials are given,
        # as in dstack; the user passes a token in `env`)
        assert report["dashboard"] in (200, 401) and report["ray_address"].startswith("http://"), report
    volume = Path(c.env["RAY_DSTACK_VOLUME_ROOT"]) / "test-hf"
    assert set(both) <= set(os.listdir(volume))
    assert c.status("fields-proc")["replicas"]["running"] == 2

    # A changed file rolls the service; .gitignore'd files never travel.
    (root / "app" / "VERSION").write_text("app v2\n")
    c.run("deploy", str(path), timeout=600, check=True)
    after = wait_until(lambda: {r["app"] for r in reports(c).values()} == {"app v2"} and reports(c),
                       timeout=120, interval=1, what="the new files on every replica")
    assert not set(after) & set(both)  # new replicas
    c.run("delete", "fields-proc", check=True)


def test_a_file_over_the_upload_limit_fails_plan_and_deploy_naming_it(cluster):
    c = cluster
    root = c.base / "big"
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    path = root / "big.dstack.yml"
    path.write_text("type: service\nname: big\nport: 8000\ncommands: [sleep 1000]\nfiles: [weights.bin]\n")
    for command in ("plan", "deploy"):
        proc = c.run(command, str(path), timeout=300)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "files[0]" in proc.stderr and "weights.bin" in proc.stderr and "2 MiB" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert "big" not in c.run("list").stdout  # nothing deployed (and no cluster started, if none ran yet)


def test_container_replica_gets_volume_file_user_privileged_and_shell(cluster):
    c = cluster
    images.busybox_image("localhost/ray-dstack-test/fields:1")
    root = c.base / "ctr"
    root.mkdir()
    (root / "motd.txt").write_text("uploaded into the container\n")
    (root / "site").mkdir()
    (root / "site" / "index.txt").write_text("a local repo, uploaded\n")
    path = root / "fields-ctr.dstack.yml"
    path.write_text(f"""type: service
name: fields-ctr
image: localhost/ray-dstack-test/fields:1
port: 8000
auth: false
user: "65534:65534"
privileged: true
shell: /bin/sh
working_dir: /tmp
volumes:
  - {node_dir(c.base)}:/data
files:
  - motd.txt:/etc/motd.txt
repos:
  - site:/srv/site
commands:
  - mkdir -p /tmp/www
  - id -u > /tmp/www/uid
  - cat /etc/motd.txt > /tmp/www/motd
  - cat /srv/site/index.txt > /tmp/www/site
  - ls /data > /tmp/www/data
  - grep CapBnd /proc/self/status > /tmp/www/cap
  - pwd > /tmp/www/pwd
  - exec httpd -f -p 8000 -h /tmp/www
""")
    c.run("deploy", str(path), timeout=600, check=True)

    def get(name: str) -> str:
        resp = httpx.get(f"{c.http}/fields-ctr/{name}", timeout=30)
        resp.raise_for_status()
        return resp.text.strip()

    assert get("uid") == "65534"
    assert get("motd") == "uploaded into the container"
    assert get("site") == "a local repo, uploaded"
    assert get("data") == "from-the-node"
    assert get("pwd") == "/tmp"
    # privileged: every capability in the bounding set (a non-root user's effective set stays empty)
    assert int(get("cap").split()[-1], 16) & (1 << 21)  # CAP_SYS_ADMIN, which an unprivileged container lacks
    c.run("delete", "fields-ctr", check=True)


def test_schedule_starts_the_service_at_the_next_cron_time(cluster):
    c = cluster
    path = c.base / "sched.dstack.yml"
    path.write_text("type: service\nname: sched\nport: 8000\nauth: false\nschedule: {cron: '* * * * *'}\n"
                    "commands: [python3 -m http.server $RAY_DSTACK_PORT]\n")
    # Deploy early in a minute, so that deploy and `status` both come before the cron time.
    wait_until(lambda: time.time() % 60 < 15, timeout=70, interval=0.5, what="the start of a minute")
    minute = int(time.time() // 60)
    c.run("deploy", str(path), timeout=300, check=True)
    status = c.status("sched")
    text = c.run("status", "sched", check=True).stdout
    if int(time.time() // 60) == minute:  # the cron time has not come yet: nothing runs
        assert "starts at" in text, text
        assert status["replicas"]["running"] == 0, status
    wait_until(lambda: httpx.get(f"{c.http}/sched/", timeout=10).status_code == 200, timeout=180, interval=2,
               what="the scheduled start")
    c.run("delete", "sched", check=True)


def test_max_duration_stops_the_service(cluster):
    c = cluster
    path = c.base / "short.dstack.yml"
    path.write_text("type: service\nname: short\nport: 8000\nauth: false\nmax_duration: 45s\n"
                    "commands: [python3 -m http.server $RAY_DSTACK_PORT]\n")
    c.run("deploy", str(path), timeout=300, check=True)
    assert httpx.get(f"{c.http}/short/", timeout=10).status_code == 200

    def stopped():
        return not c.status("short")["replicas"]["items"]

    wait_until(stopped, timeout=120, interval=2, what="max_duration to stop the replicas")
    c.run("delete", "short", check=True)


def test_docker_true_gives_the_commands_a_docker_daemon(cluster):
    c = cluster
    path = c.base / "dind.dstack.yml"
    path.write_text("type: service\nname: dind\nport: 8000\nauth: false\ndocker: true\ncommands:\n"
                    "  - mkdir www && docker ps --format '{{.Names}}' > www/ps && echo ok > www/ok\n"
                    "  - cd www && python3 -m http.server $RAY_DSTACK_PORT\n")
    c.run("deploy", str(path), timeout=600, check=True)
    assert httpx.get(f"{c.http}/dind/ok", timeout=10).text.strip() == "ok"
    c.run("delete", "dind", check=True)
