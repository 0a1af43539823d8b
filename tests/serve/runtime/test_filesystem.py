"""dstack's `volumes`, `files` and `repos` on a replica's node (ray_dstack/serve/runtime/filesystem.py): volume
resolution, where each entry lands (in place, inside a volume, or a mount), archives unpacked safely with their
modes, `if_exists`, git clones from a real local repository, credentials kept out of messages, and archives read
from a real local Ray's package store."""

from __future__ import annotations

import base64
import http.server
import io
import os
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from ray_dstack.serve.runtime import filesystem, git_clone
from ray_dstack.serve.runtime.filesystem import FilesError, Mount, prepare_files
from ray_dstack.serve.runtime.packages import Unpacker, refuse_links
from ray_dstack.spec import GitRepoSpec, MountSpec, ServiceSpec, UploadSpec
from tests.support.packages import zip_of

NOBODY = (65534, 65534)


def spec(**fields) -> ServiceSpec:
    return ServiceSpec(name="fs", commands=["true"], port=8000, **fields)


class Node:
    """A replica's directories on this node: its workspace (where the commands start) and its files directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workspace = root / "work" / "fs.r1"
        self.files = root / "work" / "fs.r1.files"
        self.workspace.mkdir(parents=True)
        self.logged: list[str] = []

    def prepare(self, service: ServiceSpec, *, in_place: bool = True, working_dir: str | None = None,
                owner=None) -> list[Mount]:
        return prepare_files(service, workspace=self.files, working_dir=working_dir or str(self.workspace),
                             in_place_under=self.workspace if in_place else None, log=self.logged.append,
                             owner=owner)


@pytest.fixture
def node(tmp_path, monkeypatch) -> Node:
    monkeypatch.setenv(filesystem.VOLUME_ROOT_ENV, str(tmp_path / "volumes"))
    return Node(tmp_path)




# --- volumes ---------------------------------------------------------------------------------------------------


def test_volume_root_from_the_environment_the_default_and_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(filesystem.VOLUME_ROOT_ENV, str(tmp_path / "vols"))
    assert filesystem.volume_root() == tmp_path / "vols"
    monkeypatch.delenv(filesystem.VOLUME_ROOT_ENV)
    writable = tmp_path / "lib" / "volumes"
    monkeypatch.setattr(filesystem, "DEFAULT_VOLUME_ROOT", str(writable))
    assert filesystem.volume_root() == writable and not writable.exists()  # resolving creates nothing
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(filesystem, "DEFAULT_VOLUME_ROOT", str(blocker / "volumes"))  # can never be created
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert filesystem.volume_root() == tmp_path / "home" / ".local" / "share" / "ray-dstack" / "volumes"


def test_named_volume_first_existing_name_else_the_first_created(node, tmp_path):
    root = tmp_path / "volumes"
    (root / "cache-1").mkdir(parents=True)
    (root / "cache-1" / "kept").write_text("old")
    mounts = node.prepare(spec(volumes=[
        MountSpec(kind="volume", names=["cache-0", "cache-1"], path="/cache"),
        MountSpec(kind="volume", names=["data-0", "data-1"], path="/data"),
    ]))
    assert mounts == [Mount(str(root / "cache-1"), "/cache"), Mount(str(root / "data-0"), "/data")]
    assert (root / "data-0").is_dir() and not (root / "data-1").exists()
    assert (root / "cache-1" / "kept").read_text() == "old"
    assert [m.describe() for m in mounts][0] == {"source": str(root / "cache-1"), "target": "/cache"}


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_a_volume_name_cannot_leave_the_root(node, name):
    with pytest.raises(FilesError, match=r"^volumes: .* is not a volume name"):
        node.prepare(spec(volumes=[MountSpec(kind="volume", names=[name], path="/v")]))


def test_instance_volume_is_created_and_owned_when_missing(node, tmp_path):
    host = tmp_path / "host" / "models"
    mounts = node.prepare(spec(volumes=[MountSpec(kind="instance", instance_path=str(host), path="/models")]),
                          owner=NOBODY)
    assert mounts == [Mount(str(host), "/models")]
    assert host.is_dir() and (host.stat().st_uid, host.stat().st_gid) == NOBODY


def test_optional_instance_volume_that_cannot_be_made_is_left_out(node, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    optional = MountSpec(kind="instance", instance_path=str(blocker / "dir"), path="/x", optional=True)
    assert node.prepare(spec(volumes=[optional])) == []
    assert any("running without it at /x (optional)" in line for line in node.logged)
    required = optional.model_copy(update={"optional": False})
    with pytest.raises(FilesError, match=r"^volumes: instance_path .*/a-file/dir cannot be created"):
        node.prepare(spec(volumes=[required]))
    # A mountable optional volume is a mount that says it is optional (the runtime decides if it can be made).
    ok = node.prepare(spec(volumes=[optional.model_copy(update={"instance_path": str(tmp_path / "ok")})]))
    assert ok == [Mount(str(tmp_path / "ok"), "/x", optional=True)]


# --- archives --------------------------------------------------------------------------------------------------


def test_unpack_keeps_modes_and_directories(tmp_path):
    made: list[Path] = []
    data = zip_of({"run.sh": (b"#!/bin/sh\necho hi\n", 0o755), "conf/": (b"", 0o750),
                   "conf/a.yaml": (b"a: 1\n", 0o600), "empty/": (b"", 0o755)})
    Unpacker(made.append).unpack(data, tmp_path / "dest", is_file=False, field="files", source="app")
    dest = tmp_path / "dest"
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "conf").stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "conf" / "a.yaml").stat().st_mode) == 0o600
    assert (dest / "empty").is_dir() and (dest / "conf" / "a.yaml").read_text() == "a: 1\n"
    assert subprocess.run([str(dest / "run.sh")], capture_output=True, text=True).stdout == "hi\n"
    assert set(made) == {dest, dest / "run.sh", dest / "conf", dest / "conf" / "a.yaml", dest / "empty"}


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil"])
def test_unpack_refuses_entries_outside_the_target(tmp_path, name):
    data = zip_of({"ok": (b"fine", 0o644), name: (b"bad", 0o644)})
    with pytest.raises(FilesError, match=r"^files: the archive of 'app' has an entry .* outside its directory"):
        Unpacker(lambda _: None).unpack(data, tmp_path / "dest", is_file=False, field="files", source="app")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "dest").exists()  # checked before anything is written


def test_unpack_refuses_symbolic_links(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(FilesError, match="symbolic link 'link'"):
        Unpacker(lambda _: None).unpack(buffer.getvalue(), tmp_path / "d", is_file=False, field="files", source="x")


def test_unpack_never_follows_a_link_planted_in_a_directory_the_service_can_write(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "cfg").symlink_to(outside)  # the service wrote this into its volume
    data = zip_of({"a.yaml": (b"a: 1\n", 0o644), "sub/": (b"", 0o755)})
    with pytest.raises(FilesError, match="is a symbolic link; refusing to write through it"):
        refuse_links(volume, volume / "cfg", field="files")
    (volume / "real").mkdir()
    (volume / "real" / "sub").symlink_to(outside)
    with pytest.raises(FilesError, match="real/sub is a symbolic link"):
        Unpacker(lambda _: None).unpack(data, volume / "real", is_file=False, field="files", source="conf")
    assert list(outside.iterdir()) == []


def test_unpack_one_file_and_never_through_an_existing_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    dest = tmp_path / "sub" / "app.cfg"
    dest.parent.mkdir()
    dest.symlink_to(outside)
    Unpacker(lambda _: None).unpack(zip_of({"whatever.cfg": (b"x=1\n", 0o640)}), dest, is_file=True,
                                    field="files", source="app.cfg")
    assert not dest.is_symlink() and dest.read_text() == "x=1\n" and outside.read_text() == "untouched"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    with pytest.raises(FilesError, match="should hold one file, it holds 2"):
        Unpacker(lambda _: None).unpack(zip_of({"a": (b"", 0o644), "b": (b"", 0o644)}), tmp_path / "f",
                                        is_file=True, field="files", source="two")


# --- git -------------------------------------------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def bare_repo(tmp_path) -> tuple[Path, dict[str, str]]:
    """A bare repository (default branch main) with two commits on main and one on branch `feature`."""
    bare, work = tmp_path / "origin.git", tmp_path / "author"
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git("init", "--quiet", "--initial-branch=main", str(work))
    (work / "app.txt").write_text("v1\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "one", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    (work / "app.txt").write_text("v2\n")
    git("commit", "--quiet", "-am", "two", cwd=work)
    git("checkout", "--quiet", "-b", "feature", cwd=work)
    (work / "app.txt").write_text("feature\n")
    git("commit", "--quiet", "-am", "three", cwd=work)
    git("push", "--quiet", str(bare), "main", "feature", cwd=work)
    return bare, {"first": first}


def test_git_clone_default_branch_branch_and_hash(node, bare_repo):
    bare, commits = bare_repo
    node.prepare(spec(git_repo=GitRepoSpec(url=str(bare))))  # path ".": the working directory itself
    assert (node.workspace / "app.txt").read_text() == "v2\n"
    # single_branch (dstack's default for services): only the checked-out branch was fetched.
    assert git("branch", "-r", cwd=node.workspace).split() == ["origin/HEAD", "->", "origin/main", "origin/main"]

    node.prepare(spec(git_repo=GitRepoSpec(url=f"file://{bare}", branch="feature", path="feat",
                                           single_branch=False)))
    assert (node.workspace / "feat" / "app.txt").read_text() == "feature\n"
    assert "origin/main" in git("branch", "-r", cwd=node.workspace / "feat")

    node.prepare(spec(git_repo=GitRepoSpec(url=str(bare), hash=commits["first"], path="old")), owner=NOBODY)
    assert (node.workspace / "old" / "app.txt").read_text() == "v1\n"
    assert git("rev-parse", "HEAD", cwd=node.workspace / "old") == commits["first"]
    assert {p.stat().st_uid for p in (node.workspace / "old").rglob("*")} == {NOBODY[0]}


def test_git_if_exists_and_errors_name_the_repo(node, bare_repo):
    bare, _ = bare_repo
    (node.workspace / "there").mkdir()
    (node.workspace / "there" / "mine").write_text("keep")
    with pytest.raises(FilesError, match=r"^repos: .*/there already has files \(if_exists: error\)"):
        node.prepare(spec(git_repo=GitRepoSpec(url=str(bare), path="there")))
    node.prepare(spec(git_repo=GitRepoSpec(url=str(bare), path="there", if_exists="skip")))
    assert os.listdir(node.workspace / "there") == ["mine"]
    assert any("cloning" in line and "skipped (if_exists: skip)" in line for line in node.logged)
    with pytest.raises(FilesError, match=r"^repos: cloning .* \(branch nope\) failed: .*nope"):
        node.prepare(spec(git_repo=GitRepoSpec(url=str(bare), branch="nope", path="n")))
    with pytest.raises(FilesError, match=r"^repos: checking out 0{40} of .* failed"):
        node.prepare(spec(git_repo=GitRepoSpec(url=str(bare), hash="0" * 40, path="h")))


def test_url_credentials_are_scrubbed():
    assert git_clone.scrub_url("fatal: https://bob:s3cret@git.example/x.git not found; ssh://tok@h/r") == (
        "fatal: https://***@git.example/x.git not found; ssh://***@h/r")
    assert git_clone.scrub_url("git@github.com:org/repo.git") == "git@github.com:org/repo.git"  # no secret there
    public, userinfo = git_clone._split_credentials("https://bob:s3cret@git.example/x.git")
    assert (public, userinfo) == ("https://git.example/x.git", "bob:s3cret")


class _AuthRecorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        auth = self.headers.get("Authorization")
        if auth is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="r"')
        else:
            self.seen.append(base64.b64decode(auth.split()[1]).decode())
            self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_git_gets_url_credentials_without_a_command_line_and_messages_hide_them(node):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://bob:s3cret@127.0.0.1:{server.server_address[1]}/team/app.git"
        with pytest.raises(FilesError) as info:
            node.prepare(spec(git_repo=GitRepoSpec(url=url, path="app")))
    finally:
        server.shutdown()
        server.server_close()
    assert _AuthRecorder.seen and set(_AuthRecorder.seen) == {"bob:s3cret"}  # git did authenticate with them
    message = str(info.value)
    assert message.startswith("repos: cloning http://***@127.0.0.1:") and "s3cret" not in message
    argv_env = git_clone._git_env(url, "http://127.0.0.1/x")
    assert argv_env["GIT_CONFIG_KEY_0"] == f"url.{url}.insteadOf"  # where they travel instead: the environment


# --- where things land -----------------------------------------------------------------------------------------


def upload(uri: str, path: str, *, is_file: bool = False, repo: bool = False, if_exists: str = "error") -> UploadSpec:
    return UploadSpec(uri=uri, path=path, source=path, size=1, is_file=is_file, repo=repo, if_exists=if_exists)


@pytest.fixture(scope="module")
def packages():
    """Ray's package store on a real local Ray: `packages[uri] = zip` stores as Ray's packaging.py does."""
    import ray
    from ray.experimental import internal_kv

    class Store:
        def __setitem__(self, uri: str, data: bytes) -> None:
            internal_kv._internal_kv_put(uri, data)

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield Store()
    finally:
        ray.shutdown()


def test_targets_in_place_inside_volumes_or_mounted(node, packages, tmp_path):
    packages["gcs://_ray_pkg_a.zip"] = zip_of({"a.txt": (b"A", 0o644)})
    packages["gcs://_ray_pkg_f.zip"] = zip_of({"cfg": (b"C", 0o644)})
    service = spec(
        volumes=[MountSpec(kind="volume", names=["data"], path="/data"),
                 MountSpec(kind="volume", names=["cache"], path="/opt/app/cache")],
        uploads=[upload("gcs://_ray_pkg_a.zip", "rel"), upload("gcs://_ray_pkg_a.zip", "/data/in-volume"),
                 upload("gcs://_ray_pkg_a.zip", "/opt/app"), upload("gcs://_ray_pkg_f.zip", "/etc/app.cfg", is_file=True),
                 upload("gcs://_ray_pkg_f.zip", "/opt/app/extra.cfg", is_file=True)])
    mounts = node.prepare(service, owner=NOBODY)
    volume = tmp_path / "volumes" / "data"
    assert (node.workspace / "rel" / "a.txt").read_text() == "A"  # under the workspace: written in place
    assert (volume / "in-volume" / "a.txt").read_text() == "A"  # inside a volume: into the volume
    staged = {m.target: m for m in mounts}
    assert sorted(staged) == ["/data", "/etc/app.cfg", "/opt/app", "/opt/app/cache"]
    targets = [m.target for m in mounts]
    assert targets.index("/opt/app") < targets.index("/opt/app/cache")  # a parent before what it holds
    assert Path(staged["/opt/app"].source, "a.txt").read_text() == "A"
    assert Path(staged["/opt/app"].source, "extra.cfg").read_text() == "C"  # inside an earlier upload's mount
    assert staged["/etc/app.cfg"].is_file and Path(staged["/etc/app.cfg"].source).read_text() == "C"
    assert all(Path(m.source).is_relative_to(node.files) for m in mounts if m.field != "volumes")
    assert (node.workspace / "rel" / "a.txt").stat().st_uid == NOBODY[0]
    assert Path(staged["/opt/app"].source).stat().st_uid == NOBODY[0]
    # A container: nothing is in place, the relative path joins the container's working directory.
    container = node.prepare(spec(uploads=[upload("gcs://_ray_pkg_a.zip", "rel")]), in_place=False,
                             working_dir="/workflow")
    assert [m.target for m in container] == ["/workflow/rel"]


def test_a_repo_before_the_files_and_if_exists(node, packages):
    packages["gcs://_ray_pkg_repo.zip"] = zip_of({"app.py": (b"repo", 0o644), "README": (b"r", 0o644)})
    packages["gcs://_ray_pkg_files.zip"] = zip_of({"app.py": (b"files", 0o644)})
    # The files entry comes first in the list; the repo is still unpacked before it (dstack's order).
    node.prepare(spec(uploads=[upload("gcs://_ray_pkg_files.zip", "."),
                               upload("gcs://_ray_pkg_repo.zip", ".", repo=True)]))
    assert (node.workspace / "app.py").read_text() == "files" and (node.workspace / "README").exists()
    with pytest.raises(FilesError, match=r"^repos: .* already has files \(if_exists: error\)"):
        node.prepare(spec(uploads=[upload("gcs://_ray_pkg_repo.zip", ".", repo=True)]))
    (node.workspace / "app.py").write_text("mine")
    node.prepare(spec(uploads=[upload("gcs://_ray_pkg_repo.zip", ".", repo=True, if_exists="skip")]))
    assert (node.workspace / "app.py").read_text() == "mine"
    with pytest.raises(FilesError, match=r"^files: 'gone' \(gcs://_ray_pkg_gone.zip\) is no longer in the cluster"):
        node.prepare(spec(uploads=[UploadSpec(uri="gcs://_ray_pkg_gone.zip", path="g", source="gone", size=1)]))


# --- Ray's package store ---------------------------------------------------------------------------------------


def test_an_archive_with_an_executable_from_the_package_store(node, packages):
    data = zip_of({"bin/serve.sh": (b"#!/bin/sh\necho served\n", 0o755), "data.txt": (b"payload", 0o644)})
    packages["gcs://_ray_pkg_h1test.zip"] = data
    node.prepare(spec(uploads=[UploadSpec(uri="gcs://_ray_pkg_h1test.zip", path="app", source="./app",
                                          size=len(data))]))
    script = node.workspace / "app" / "bin" / "serve.sh"
    assert subprocess.run([str(script)], capture_output=True, text=True).stdout == "served\n"
    assert (node.workspace / "app" / "data.txt").read_text() == "payload"


def test_reading_a_package_outside_ray_says_so():
    code = ("from ray_dstack.serve.runtime.packages import read_package\n"
            "try:\n    read_package('gcs://_ray_pkg_x.zip', field='files', source='./x')\n"
            "except Exception as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "files: './x' cannot be read: this process is not connected to a Ray cluster"
