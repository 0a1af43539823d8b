"""`files` / local `repos`: packing as dstack packs them (ignore files, limit, content-named URIs) and the trip
through Ray's package store on a real local Ray (upload, existence, records, clean-up, a driver reading it back)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from ray_dstack.cli.main import main
from ray_dstack.config import load_service
from ray_dstack.deploy.ignore_rules import is_ignored, match, parse_line
from ray_dstack.deploy.uploads import (
    DEFAULT_UPLOAD_LIMIT,
    UPLOAD_LIMIT_ENV,
    Entry,
    UploadError,
    pack_entry,
    pack_uploads,
    parse_size,
    upload_limit,
)
from ray_dstack.errors import UsageError

SERVICE = "type: service\nname: up\ncommands: [python3 -m http.server $RAY_DSTACK_PORT]\nport: 8000\n"


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def listing(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def service_file(directory: Path, extra: str) -> Path:
    path = directory / "svc.dstack.yml"
    path.write_text(SERVICE + extra)
    return path


def packed_of(path: Path, limit: int = DEFAULT_UPLOAD_LIMIT):
    return pack_uploads(load_service(str(path)), limit)


# --- gitignore syntax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, path, is_dir, expected", [
    ("*.log", "a.log", False, True),
    ("*.log", "deep/down/a.log", False, True),  # no slash: any level
    ("/*.log", "deep/a.log", False, None),  # leading slash: this directory only
    ("build/", "build", True, True),
    ("build/", "build", False, None),  # a trailing slash matches directories only
    ("doc/frotz", "doc/frotz", False, True),
    ("doc/frotz", "a/doc/frotz", False, None),  # a middle slash anchors too
    ("**/foo", "a/b/foo", False, True),
    ("**/foo", "foo", False, True),
    ("a/**/b", "a/b", False, True),
    ("a/**/b", "a/x/y/b", False, True),
    ("abc/**", "abc/x/y", False, True),
    ("abc/**", "abc", True, None),  # the contents, not the directory
    ("?.txt", "a.txt", False, True),
    ("?.txt", "ab.txt", False, None),
    ("*.txt", "a/b.txt", False, True),
    ("a*", "dir/abc", False, True),
    ("x/*", "x/y/z", False, None),  # `*` never crosses a slash
    ("[abc].py", "b.py", False, True),
    ("[!abc].py", "b.py", False, None),
    ("[!abc].py", "d.py", False, True),
    ("\\#hash", "#hash", False, True),
    ("\\!bang", "!bang", False, True),
    ("trailing\\ ", "trailing ", False, True),
    ("spaces   ", "spaces", False, True),
])
def test_gitignore_patterns(pattern, path, is_dir, expected):
    rule = parse_line(pattern)
    assert rule is not None
    assert match((rule,), path, is_dir) is expected


def test_comments_and_blank_lines_are_no_rules_and_the_last_matching_line_decides():
    assert parse_line("# a comment") is None and parse_line("   ") is None and parse_line("/") is None
    rules = tuple(r for r in map(parse_line, ["*.txt", "!keep.txt", "# x"]) if r)
    assert match(rules, "drop.txt", False) is True
    assert match(rules, "keep.txt", False) is False
    assert match(rules, "other.md", False) is None


def test_closest_directory_decides_and_dstackignore_before_gitignore(tmp_path):
    tree(tmp_path, {".gitignore": "*.bin\n", "sub/.gitignore": "!keep.bin\n", "sub/.dstackignore": "secret*\n",
                    ".dstackignore": "!wanted.bin\n"})
    chain = [tmp_path / "sub", tmp_path]
    assert is_ignored(tmp_path / "sub" / "x.bin", False, chain)
    assert not is_ignored(tmp_path / "sub" / "keep.bin", False, chain)  # the closer .gitignore re-includes
    assert not is_ignored(tmp_path / "sub" / "wanted.bin", False, chain)  # .dstackignore outranks .gitignore
    assert is_ignored(tmp_path / "sub" / "secret.txt", False, chain)
    assert not is_ignored(tmp_path / "sub" / "plain.txt", False, chain)


# --- packing ------------------------------------------------------------------------------------------------


def test_a_directory_packs_its_content_honouring_ignore_files_up_to_the_config_dir(tmp_path):
    (tmp_path / ".gitignore").write_text("*\n")  # above the configuration's directory: not read
    conf = tree(tmp_path / "conf", {
        ".gitignore": "*.tmp\n",  # the configuration's directory: counts for the entry below it
        "data/a.txt": "a",
        "data/b.tmp": "scratch",
        "data/.gitignore": "logs/\n!important.tmp\n",
        "data/important.tmp": "kept by a closer line",
        "data/logs/x.log": "x",
        "data/.hidden": "hidden files travel",
        "data/sub/.dstackignore": "*.ckpt\n",
        "data/sub/m.ckpt": "big",
        "data/sub/m.py": "code",
        "data/empty/.keep": "",
    })
    [item] = packed_of(service_file(conf, "files: [data:/srv/data]\n"))
    files = listing(item.data)
    assert sorted(files) == [".gitignore", ".hidden", "a.txt", "empty/", "empty/.keep", "important.tmp",
                             "sub/", "sub/.dstackignore", "sub/m.py"]
    assert files["a.txt"] == b"a"
    spec = item.spec
    assert (spec.path, spec.source, spec.is_file, spec.repo) == ("/srv/data", "data", False, False)
    assert spec.size == len(item.data)
    assert spec.uri.startswith("gcs://_ray_pkg_") and spec.uri.endswith(".zip") and len(spec.uri) == 15 + 64 + 4


def test_ignore_files_count_up_to_the_repository_root_above_the_config(tmp_path):
    (tmp_path / ".gitignore").write_text("*\n")  # above the repository: not read
    repo = tree(tmp_path / "repo", {".gitignore": "*.secret\n", "project/svc/data/a.txt": "a",
                                     "project/svc/data/b.secret": "b", ".git/HEAD": "ref: refs/heads/main"})
    [item] = packed_of(service_file(repo / "project" / "svc", "files: [data]\n"))
    assert sorted(listing(item.data)) == ["a.txt"]


def test_a_repository_root_stops_the_ignore_files_above_and_its_git_stays_home(tmp_path):
    conf = tree(tmp_path / "conf", {".gitignore": "*.txt\n", "src/.git/HEAD": "ref: refs/heads/main",
                                    "src/app.py": "print(1)", "src/notes.txt": "kept: the repo root stops"})
    [item] = packed_of(service_file(conf, "repos: [src]\n"))
    assert sorted(listing(item.data)) == ["app.py", "notes.txt"]


def test_a_single_file_is_the_archive_root_and_relative_paths_follow_the_config_file(tmp_path, monkeypatch):
    tree(tmp_path, {"conf/model.bin": "weights", "conf/.gitignore": "*.bin\n"})
    monkeypatch.chdir("/")
    [item] = packed_of(service_file(tmp_path / "conf", "files: [model.bin]\n"))
    assert listing(item.data) == {"model.bin": b"weights"}  # named explicitly: ignore files do not apply
    assert (item.spec.path, item.spec.is_file) == ("model.bin", True)


def test_the_same_files_give_the_same_uri_and_bytes_and_a_change_rolls(tmp_path):
    data = tree(tmp_path / "data", {"a.txt": "a", "b/c.txt": "c"})
    entry = Entry("files[0]", "data", "data", False)
    first = pack_entry(entry, tmp_path, DEFAULT_UPLOAD_LIMIT)
    os.utime(data / "a.txt", (1, 1))  # timestamps do not count
    again = pack_entry(entry, tmp_path, DEFAULT_UPLOAD_LIMIT)
    assert (again.spec.uri, again.data) == (first.spec.uri, first.data)
    (data / "a.txt").write_text("A")
    changed = pack_entry(entry, tmp_path, DEFAULT_UPLOAD_LIMIT)
    assert changed.spec.uri != first.spec.uri
    (data / "a.txt").write_text("a")
    os.chmod(data / "a.txt", 0o755)  # modes are kept, so they count
    executable = pack_entry(entry, tmp_path, DEFAULT_UPLOAD_LIMIT)
    assert executable.spec.uri not in (first.spec.uri, changed.spec.uri)
    with zipfile.ZipFile(io.BytesIO(executable.data)) as archive:
        info = archive.getinfo("a.txt")
        assert stat.S_IMODE(info.external_attr >> 16) == 0o755 and stat.S_ISREG(info.external_attr >> 16)
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert stat.S_ISDIR(archive.getinfo("b/").external_attr >> 16)


def test_symlinks_inside_the_entry_travel_as_what_they_point_to_and_links_out_of_it_do_not(tmp_path):
    outside = tree(tmp_path / "outside", {"shared.txt": "secret"})
    data = tree(tmp_path / "data", {"real/f.txt": "f", "conf/c.txt": "c"})
    (data / "link.txt").symlink_to(data / "real" / "f.txt")
    (data / "dirlink").symlink_to(data / "conf")
    (data / "out.txt").symlink_to(outside / "shared.txt")  # e.g. ~/.aws/credentials
    (data / "outdir").symlink_to(outside)
    (data / "real" / "up").symlink_to(data)  # a loop
    (data / "dangling").symlink_to(tmp_path / "nowhere")
    item = pack_entry(Entry("files[0]", "data", "data", False), tmp_path, DEFAULT_UPLOAD_LIMIT)
    files = listing(item.data)
    assert files["link.txt"] == b"f" and files["dirlink/c.txt"] == b"c"
    assert sorted(files) == ["conf/", "conf/c.txt", "dirlink/", "dirlink/c.txt", "link.txt", "real/", "real/f.txt"]
    assert b"secret" not in item.data


def test_a_local_repo_is_packed_with_its_path_and_if_exists(tmp_path):
    tree(tmp_path, {"src/app.py": "print(1)"})
    [item] = packed_of(service_file(tmp_path, "repos:\n  - local_path: src\n    path: /workflow\n"
                                              "    if_exists: skip\n"))
    assert (item.spec.repo, item.spec.path, item.spec.if_exists, item.spec.source) == (True, "/workflow", "skip", "src")
    assert sorted(listing(item.data)) == ["app.py"]


def test_a_url_repo_is_not_packed(tmp_path):
    assert packed_of(service_file(tmp_path, "repos: [https://github.com/org/repo.git]\n")) == []


def test_a_missing_path_names_the_entry_with_exit_code_2(tmp_path):
    path = service_file(tmp_path, "files: [here.txt, ./not-there:/x]\n")
    (tmp_path / "here.txt").write_text("x")
    with pytest.raises(UploadError) as info:
        packed_of(path)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    message = str(info.value)
    assert "files[1]: ./not-there: no such file or directory" in message and str(tmp_path / "not-there") in message


def test_an_archive_over_the_limit_names_the_entry_its_size_and_how_to_raise_it(tmp_path):
    tree(tmp_path, {"small.txt": "s"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "noise.bin").write_bytes(os.urandom(3 * 1024**2 + 100 * 1024))
    path = service_file(tmp_path, "files: [small.txt, ./data]\n")
    with pytest.raises(UploadError) as info:
        packed_of(path)
    assert str(info.value) == (
        f"{path}: files[1]: ./data (3.1 MiB) is over the 2 MiB upload limit; set --upload-limit or "
        f"${UPLOAD_LIMIT_ENV} (bytes or e.g. 10MiB; 0 = no limit), or leave files out with .gitignore or "
        ".dstackignore")
    assert [p.spec.source for p in packed_of(path, limit=0)] == ["small.txt", "./data"]
    assert [p.spec.source for p in packed_of(path, limit=4 * 1024**2)] == ["small.txt", "./data"]


def test_a_huge_entry_stops_packing_at_the_budget(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "noise.bin").write_bytes(os.urandom(17 * 1024**2))
    with pytest.raises(UploadError, match=r"files\[0\]: data \(more than 16 MiB packed\) is over the 1 KiB"):
        pack_entry(Entry("files[0]", "data", "data", False), tmp_path, 1024)


def test_the_limit_from_the_option_else_the_environment_else_2_mib(monkeypatch):
    monkeypatch.delenv(UPLOAD_LIMIT_ENV, raising=False)
    assert upload_limit() == 2 * 1024**2
    monkeypatch.setenv(UPLOAD_LIMIT_ENV, "10MiB")
    assert upload_limit() == 10 * 1024**2
    assert upload_limit("0") == 0
    assert upload_limit("512k") == 512 * 1024
    assert [parse_size(s) for s in ("2097152", "2M", "2mb", "1.5GiB")] == [2097152, 2097152, 2097152, 3 * 1024**3 // 2]
    monkeypatch.setenv(UPLOAD_LIMIT_ENV, "lots")
    with pytest.raises(UsageError, match=r"\$RAY_DSTACK_UPLOAD_LIMIT: invalid size 'lots'"):
        upload_limit()


def test_plan_shows_each_entry_with_its_size_and_fails_with_2_on_an_oversized_one(tmp_path, capsys):
    tree(tmp_path, {"data/a.txt": "a" * 5000})
    path = service_file(tmp_path, "files: [data:/srv/data]\n")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# files: data → /srv/data (" in out and "gcs://_ray_pkg_" in out
    assert main(["plan", str(path), "--json"]) == 0
    [upload] = json.loads(capsys.readouterr().out)["uploads"]
    assert upload["path"] == "/srv/data" and upload["size"] > 0
    assert main(["plan", str(path), "--upload-limit", "100"]) == 2
    assert "files[0]: data (" in capsys.readouterr().err


# --- Ray's package store, on a real local Ray -------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    """A local head with its dashboard on free ports (the address file of any other Ray here is put back)."""
    from ray.cluster_utils import Cluster

    from tests.support.multinode import AddressFileGuard
    from conftest import free_port, wait_until

    guard = AddressFileGuard()
    dash_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash_port,
        "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(), "metrics_agent_port": free_port(),
        "runtime_env_agent_port": free_port(), "object_store_memory": 80 * 1024 * 1024})
    try:
        from ray_dstack.deploy.dashboard import DashboardClient

        dashboard = f"http://127.0.0.1:{dash_port}"
        with DashboardClient(dashboard, timeout_s=10) as client:
            wait_until(client.ping, timeout=60, interval=0.5, what="the dashboard")
        yield cluster, dashboard
    finally:
        cluster.shutdown()
        guard.restore()


@pytest.fixture
def store(ray_head, monkeypatch):
    from ray_dstack.deploy.dashboard import DashboardClient
    from ray_dstack.deploy.package_store import PackageStore

    cluster, dashboard = ray_head
    monkeypatch.setenv("RAY_DSTACK_GCS_ADDRESS", cluster.address)
    with DashboardClient(dashboard) as client:
        yield PackageStore(client)


def packed_dir(tmp_path: Path, name: str, files: dict[str, str], path: str = "data"):
    tree(tmp_path / name, files)
    return pack_entry(Entry("files[0]", name, path, False), tmp_path, DEFAULT_UPLOAD_LIMIT)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_upload_record_and_a_driver_reads_the_package_back(store, ray_head, tmp_path):
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    item = packed_dir(tmp_path, "v1", {"a.txt": "one", "bin/run.sh": "#!/bin/sh\n"})
    assert not store.exists(item.spec.uri)
    assert store.begin("svc-read", [item]) == []
    assert store.exists(item.spec.uri)
    assert store.record("svc-read") == [item.spec.uri]
    assert store.upload([item]) == []  # present: not sent again
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head[0].address, log_to_driver=False)
    try:
        # What a replica does: the package is the KV entry named by its URI, in the default namespace.
        assert _internal_kv_get(item.spec.uri) == item.data
    finally:
        ray.shutdown()
    assert sorted(listing(item.data)) == ["a.txt", "bin/", "bin/run.sh"]
    assert store.commit("svc-read", [item], []) == []
    assert store.forget("svc-read") == [item.spec.uri]
    assert not store.exists(item.spec.uri)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_package_goes_once_no_service_lists_it(store, tmp_path):
    old = packed_dir(tmp_path, "old", {"a.txt": "old"})
    new = packed_dir(tmp_path, "new", {"a.txt": "new"})
    # Service a runs `old`; service b uses the very same files.
    store.commit("a", [old], store.begin("a", [old]))
    store.commit("b", [old], store.begin("b", [old]))
    # a's redeploy: while it rolls out both versions are listed (a rollback needs the running one).
    previous = store.begin("a", [new])
    assert previous == [old.spec.uri]
    assert sorted(store.record("a")) == sorted([old.spec.uri, new.spec.uri])
    assert store.commit("a", [new], previous) == []  # b still lists `old`
    assert store.record("a") == [new.spec.uri] and store.exists(old.spec.uri)
    assert store.forget("b") == [old.spec.uri]
    assert not store.exists(old.spec.uri) and store.exists(new.spec.uri)
    # A failed deploy puts the record back and drops what only it uploaded.
    newer = packed_dir(tmp_path, "newer", {"a.txt": "newer"})
    previous = store.begin("a", [newer])
    assert store.abort("a", [newer], previous) == [newer.spec.uri]
    assert store.record("a") == [new.spec.uri] and store.exists(new.spec.uri) and not store.exists(newer.spec.uri)
    # A redeploy without files: nothing listed, nothing left.
    assert store.commit("a", [], store.begin("a", [])) == [new.spec.uri]
    assert store.records().get("a") is None and not store.exists(new.spec.uri)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deploy_uploads_and_delete_cleans_up(ray_head, store, tmp_path):
    """The CLI's wiring: `deploy --detach` uploads and records before Serve gets the config; a detached redeploy
    with other files keeps the running version's package too (no wait tells it the new one came up); `delete`
    drops the record and the packages."""
    from conftest import BIN, REPO, free_port

    cluster, dashboard = ray_head
    env = {**os.environ, "RAY_DSTACK_GCS_ADDRESS": cluster.address, "RAY_DSTACK_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    tree(tmp_path, {"data/a.txt": "one"})
    path = service_file(tmp_path, "auth: false\nfiles: [data]\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        extra = ["--http-port", str(http_port), "--detach"] if args[0] == "deploy" else []
        proc = subprocess.run([str(BIN / "ray-dstack"), *args, "--address", dashboard, *extra],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    http_port = free_port()
    first = cli("deploy", str(path))
    [uri] = store.record("up")
    assert store.exists(uri) and uri in first.stderr
    (tmp_path / "data" / "a.txt").write_text("two")
    cli("deploy", str(path))
    [uri2] = [u for u in store.record("up") if u != uri]
    assert sorted(store.record("up")) == sorted([uri, uri2]) and store.exists(uri2) and store.exists(uri)
    cli("delete", "up")
    assert store.records().get("up") is None and not store.exists(uri2) and not store.exists(uri)
