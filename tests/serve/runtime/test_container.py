"""The container command a replica runs (exact argv for podman and docker, 0/1/2 GPUs), the runtime choice,
and the files that keep secrets off command lines (mode 0600, removed afterwards)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from ray_dstack.serve.runtime import container as c
def run_spec(runtime: str, **kw) -> c.ContainerRun:
    base = dict(runtime=runtime, name="llm-r1", image="ghcr.io/acme/tgi:2", container_port=8000, host_port=41000,
                commands=["text-generation-launcher --port 8000"], env_file="/tmp/x/env")
    return c.ContainerRun(**{**base, **kw})


HEAD = ["run", "--name", "llm-r1", "--init", "--rm", "--pull", "never", "-p", "127.0.0.1:41000:8000",
        "--env-file", "/tmp/x/env"]
SCRIPT = ["--entrypoint", "/bin/sh", "ghcr.io/acme/tgi:2", "-c", "set -e\ntext-generation-launcher --port 8000\n"]


@pytest.mark.parametrize("gpus,podman_flags,docker_flags", [
    ([], [], []),
    ([3], ["--device", "nvidia.com/gpu=3"], ["--gpus", '"device=3"']),
    ([0, 2], ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=2"], ["--gpus", '"device=0,2"']),
])
def test_exact_command_for_0_1_2_gpus(gpus, podman_flags, docker_flags):
    assert run_spec("podman", gpu_ids=gpus).argv() == ["podman", *HEAD, *podman_flags, *SCRIPT]
    assert run_spec("docker", gpu_ids=gpus).argv("/usr/bin/docker") == ["/usr/bin/docker", *HEAD, *docker_flags,
                                                                         *SCRIPT]


def test_shm_workdir_labels_node_flags_and_multiline_env():
    argv = run_spec("podman", shm_size_bytes=2 * 1024**3, working_dir="/workspace", labels={"ray-dstack.owner": "7:9"},
                    env_from_process=["TEMPLATE"],
                    flags=c.extra_flags({c.FLAGS_ENV: "--runtime runc --ulimit nofile=1024:1024"})).argv()
    assert argv == ["podman", "run", "--name", "llm-r1", "--init", "--rm", "--pull", "never",
                    "--label", "ray-dstack.owner=7:9", "-p", "127.0.0.1:41000:8000", "--env-file", "/tmp/x/env",
                    "--env", "TEMPLATE", "--shm-size", str(2 * 1024**3), "--workdir", "/workspace",
                    "--runtime", "runc", "--ulimit", "nofile=1024:1024", *SCRIPT]


def test_no_commands_runs_the_images_own_entrypoint_and_cmd():
    argv = run_spec("podman", commands=[]).argv()
    assert argv[-1] == "ghcr.io/acme/tgi:2" and "--entrypoint" not in argv


def test_entrypoint_replaces_the_images_and_commands_become_its_arguments():
    argv = run_spec("docker", entrypoint="python3 -m server", commands=["--port", "8000"]).argv()
    i = argv.index("--entrypoint")
    assert argv[i:] == ["--entrypoint", "python3", "ghcr.io/acme/tgi:2", "-m", "server", "--port", "8000"]


def test_container_name_is_service_and_replica_in_allowed_characters():
    assert c.container_name("llm", "ServiceReplica#ab12") == "llm-ServiceReplica-ab12"


def test_runtime_choice():
    both = {"podman": "/usr/bin/podman", "docker": "/usr/bin/docker"}.get
    assert c.detect_runtime({}, which=both, node="n1") == c.Runtime("podman", "/usr/bin/podman")
    assert c.detect_runtime({c.RUNTIME_ENV: "docker"}, which=both, node="n1").name == "docker"
    only_docker = {"docker": "/usr/bin/docker"}.get
    assert c.detect_runtime({}, which=only_docker, node="n1").name == "docker"
    with pytest.raises(c.ContainerError) as err:
        c.detect_runtime({}, which=lambda _: None, node="gpu-node-7")
    assert "gpu-node-7" in str(err.value) and "apt-get install podman runc" in str(err.value)
    with pytest.raises(c.ContainerError, match="expected podman or docker"):
        c.detect_runtime({c.RUNTIME_ENV: "lxc"}, which=both, node="n1")
    with pytest.raises(c.ContainerError, match="no such executable"):
        c.detect_runtime({c.RUNTIME_ENV: "podman"}, which=lambda _: None, node="n1")


def test_env_file_is_private_and_values_with_newlines_stay_off_it(tmp_path):
    d = c.private_dir("ray-dstack-test-")
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        path, multiline = c.write_env_file(d, {"HF_TOKEN": "hf_abc=def", "T": "a\nb", "EMPTY": ""})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert open(path).read() == "HF_TOKEN=hf_abc=def\nEMPTY=\n"
        assert multiline == ["T"]
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("runtime,image,key", [
    ("podman", "127.0.0.1:5000/acme/tgi:1", "127.0.0.1:5000"),
    ("podman", "ghcr.io/acme/tgi", "ghcr.io"),
    ("podman", "acme/tgi", "docker.io"),
    ("docker", "acme/tgi", "https://index.docker.io/v1/"),
])
def test_auth_file_names_the_registry(runtime, image, key):
    data = json.loads(c.auth_file_json(runtime, image, "bot", "pw:x"))
    assert base64.b64decode(data["auths"][key]["auth"]).decode() == "bot:pw:x"


def fake_runtime(tmp_path, script: str) -> c.Runtime:
    """A `podman` that records its argv and the auth file it was given (mode and content), then runs `script`."""
    exe = tmp_path / "podman"
    exe.write_text(f"#!{sys.executable}\n" + (
        "import json, os, sys\n"
        "argv = sys.argv[1:]\n"
        f"log = {str(tmp_path / 'calls.jsonl')!r}\n"
        "rec = {'argv': argv}\n"
        "if '--authfile' in argv:\n"
        "    f = argv[argv.index('--authfile') + 1]\n"
        "    rec['mode'] = oct(os.stat(f).st_mode & 0o777); rec['dir_mode'] = oct(os.stat(os.path.dirname(f)).st_mode & 0o777)\n"
        "    rec['auth'] = json.load(open(f)); rec['file'] = f\n"
        "open(log, 'a').write(json.dumps(rec) + '\\n')\n"
    ) + script)
    exe.chmod(0o755)
    return c.Runtime("podman", str(exe))


def calls(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_pull_with_credentials_uses_a_private_auth_file_removed_afterwards(tmp_path):
    rt = fake_runtime(tmp_path, "print('Trying to pull...'); sys.exit(0)\n")
    assert c.pull(rt, "127.0.0.1:5000/acme/tgi:1", username="bot", password="hunter2-pw") is True
    (pull,) = calls(tmp_path)  # credentials given: no "already here?" shortcut, the registry must check them
    assert pull["argv"][:2] == ["pull", "--authfile"] and pull["argv"][-1] == "127.0.0.1:5000/acme/tgi:1"
    assert pull["mode"] == "0o600" and pull["dir_mode"] == "0o700"
    assert "hunter2-pw" not in " ".join(pull["argv"])
    assert base64.b64decode(pull["auth"]["auths"]["127.0.0.1:5000"]["auth"]).decode() == "bot:hunter2-pw"
    assert not os.path.exists(pull["file"]) and not os.path.exists(os.path.dirname(pull["file"]))


def test_failed_pull_carries_the_registrys_reason_and_never_the_password(tmp_path):
    rt = fake_runtime(tmp_path, "print('Trying to pull 127.0.0.1:5000/acme/tgi:1...')\n"
                                "print('Error: initializing source: reading manifest 1 in 127.0.0.1:5000/acme/tgi: "
                                "unauthorized: authentication required (tried hunter2-pw)')\nsys.exit(125)\n")
    with pytest.raises(c.ContainerError) as err:
        c.pull(rt, "127.0.0.1:5000/acme/tgi:1", username="bot", password="hunter2-pw")
    text = str(err.value)
    assert "unauthorized: authentication required" in text and "hunter2-pw" not in text and "***" in text
    assert not os.path.exists(calls(tmp_path)[0]["file"])


def test_image_without_credentials_is_pulled_once_per_node(tmp_path):
    rt = fake_runtime(tmp_path, "sys.exit(0)\n")  # `image exists` answers yes
    assert c.pull(rt, "busybox:1") is False
    assert [call["argv"][:2] for call in calls(tmp_path)] == [["image", "exists"]]


def test_container_run_removes_the_container_and_the_env_dir(tmp_path):
    """container_run: the env dir goes once the container exists, `rm -f NAME` at exit (here the run ends)."""
    rt = fake_runtime(tmp_path, "sys.exit(3 if argv[0] == 'run' else 0)\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "env").write_text("A=1\n")
    proc = subprocess.run([sys.executable, "-m", "ray_dstack.serve.runtime.container_run", "--runtime", rt.path, "--name",
                           "svc-r1", "--secret-dir", str(secret), "--", rt.path, "run", "--name", "svc-r1", "img"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert not secret.exists()
    argvs = [call["argv"] for call in calls(tmp_path)]
    assert argvs[0][:2] == ["rm", "-f"] and argvs[0][-1] == "svc-r1"  # a leftover of the same name first
    assert argvs[-1][:2] == ["rm", "-f"] and argvs[-1][-1] == "svc-r1"
    assert ["run", "--name", "svc-r1", "img"] in argvs


def test_owner_label_tells_a_live_replica_from_a_gone_one():
    assert c.owner_alive(c.owner_label())
    assert not c.owner_alive(f"{os.getpid()}:0")  # same pid, other start time: a reused pid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    label = c.owner_label(child.pid)
    child.wait()
    assert not c.owner_alive(label)
