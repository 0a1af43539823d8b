"""pasta's command line, the namespaces setting, the replica's working directory, the init supervisor."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ray_dstack.errors import RayDstackError, UsageError
from ray_dstack.serve.runtime import netns
from ray_dstack.serve.runtime import workspace
def test_pasta_argv_maps_a_loopback_host_port_and_nothing_else():
    argv = netns.pasta_argv("/usr/bin/pasta", 41000, 8000, uid=0)
    at = argv.index("/usr/bin/pasta")
    assert argv[at:at + 3] == ["/usr/bin/pasta", "--runas", "0"]
    # As root pasta runs in a private mount namespace, where the PID namespace gets its own /proc.
    if netns.own_proc(0):
        assert argv[:at] == [shutil.which("unshare"), "--mount", "--propagation", "private", "--"]
    else:
        assert at == 0
    assert argv[argv.index("-t") + 1] == "127.0.0.1/41000:8000"
    # No automatic forwarding of the host's ports into the namespace (it would take 8000 itself).
    for flag in ("-T", "-U", "-u"):
        assert argv[argv.index(flag) + 1] == "none"
    assert argv[-1] == "--" and "--config-net" in argv
    assert "--runas" not in netns.pasta_argv("pasta", 41000, 8000, uid=1000)


@pytest.mark.parametrize(("value", "pasta", "expected"), [
    ("off", "/usr/bin/pasta", False), ("on", None, True), ("auto", None, False), ("auto", "/x/pasta", True),
    (None, "/x/pasta", True),
])
def test_setting(monkeypatch, value, pasta, expected):
    if value is None:
        monkeypatch.delenv(netns.NETNS_ENV, raising=False)
    else:
        monkeypatch.setenv(netns.NETNS_ENV, value)
    monkeypatch.setattr(netns, "pasta_path", lambda: pasta)
    assert netns.available() is expected


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(netns.NETNS_ENV, "maybe")
    with pytest.raises(UsageError, match=netns.NETNS_ENV):
        netns.available()


def test_workspace_and_working_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.WORK_ROOT_ENV, str(tmp_path / "work"))
    ws = workspace.create("svc", "abc123")
    assert ws == tmp_path / "work" / "svc.abc123" and ws.is_dir()
    assert workspace.working_dir(ws, None) == ws
    assert workspace.working_dir(ws, "sub/dir") == ws / "sub" / "dir" and (ws / "sub" / "dir").is_dir()
    assert workspace.working_dir(ws, str(tmp_path)) == tmp_path
    with pytest.raises(RayDstackError, match="does not exist"):
        workspace.working_dir(ws, str(tmp_path / "nope"))
    workspace.remove(ws)
    assert not ws.exists()


def test_init_mode_refuses_outside_a_pid_namespace():
    # kill(-1) from a process that is not PID 1 would signal the whole machine.
    proc = subprocess.run([sys.executable, "-m", "ray_dstack.serve.runtime.supervise", "--init", "--", "true"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "PID 1" in proc.stderr


def test_cleanup_dir_removed_when_the_commands_end(tmp_path):
    work = tmp_path / "replica-work"
    work.mkdir()
    (work / "file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "ray_dstack.serve.runtime.supervise", "--cleanup", str(work), "--",
                           "bash", "-c", "exit 3"], capture_output=True, timeout=30, check=False)
    assert proc.returncode == 3 and not work.exists()
