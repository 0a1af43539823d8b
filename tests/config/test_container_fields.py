"""dstack's container and service fields (`volumes`, `files`, `repos`, `user`, `shell`, `docker`,
`privileged`, `dstack`, `strip_prefix`, `stop_duration`, `max_duration`): dstack's shorthand, defaults and
messages, each error with its field path and YAML line."""

from __future__ import annotations

import pytest

from ray_dstack.config.models.container import InstanceMount, VolumeMount, shell_path
from ray_dstack.config.models.service import IGNORED_FIELDS
from tests.support.config_helpers import BASE, errors, load


def config(extra: str):
    return load(BASE + extra).config


def problems(extra: str) -> list[tuple[str, int | None, str]]:
    return [(p.path, p.line, p.message) for p in errors(BASE + extra).problems]


# --- volumes


def test_volume_shorthand_is_a_node_directory_when_the_source_has_a_slash():
    c = config("volumes:\n  - /data/hf:/root/.cache/huggingface\n  - cache:/cache\n")
    assert c.volumes == [InstanceMount(instance_path="/data/hf", path="/root/.cache/huggingface"),
                         VolumeMount(name="cache", path="/cache")]


def test_volume_mappings_with_optional_and_several_names():
    c = config("volumes:\n  - {instance_path: /mnt/models, path: /models, optional: true}\n"
               "  - name: [cache-a, 'cache-${{ dstack.node_rank }}']\n    path: /cache\n")
    assert c.volumes[0] == InstanceMount(instance_path="/mnt/models", path="/models", optional=True)
    assert c.volumes[1].names == ["cache-a", "cache-${{ dstack.node_rank }}"]


def test_volume_paths_are_absolute_without_dot_dot():
    assert problems("volumes:\n  - /a:relative\n  - /a/../b:/x\n  - /a:/x/../y\n") == [
        ("volumes[0].path", 5, "path must be absolute: relative"),
        ("volumes[1].instance_path", 6, ".. are not allowed: /a/../b"),
        ("volumes[2].path", 7, ".. are not allowed: /x/../y"),
    ]


def test_volume_format_and_names():
    assert problems("volumes:\n  - a:b:c\n  - {path: /x}\n  - name: []\n    path: /x\n"
                    "  - name: 'v-${{ dstack.replica }}'\n    path: /y\n") == [
        ("volumes[0]", 5, "invalid mount point format: a:b:c (expected `/node/path:/path` or `name:/path`)"),
        ("volumes[1]", 6, "a volume needs `name` (a network volume) or `instance_path` (a node directory)"),
        ("volumes[2].name", 7, "`name` lists no volume"),
        ("volumes[3].name", 9, "unknown variable `dstack.replica` in volume name 'v-${{ dstack.replica }}' "
                               "(known: dstack.job_num, dstack.node_rank)"),
    ]


# --- files and repos


def test_files_shorthand_defaults_the_path_to_the_local_path():
    c = config("files:\n  - app.py\n  - ./data:/opt/data\n  - {local_path: conf}\n  - 'C:\\src:/src'\n")
    assert [(f.local_path, f.path) for f in c.files] == [
        ("app.py", "app.py"), ("./data", "/opt/data"), ("conf", "conf"), ("C:\\src", "/src")]


def test_files_errors():
    assert problems("files:\n  - a:b:c\n  - {local_path: x, path: 'C:\\x'}\n") == [
        ("files[0]", 5, "invalid file path mapping: a:b:c"),
        ("files[1].path", 6, "path must be a Unix file path: C:\\x"),
    ]


@pytest.mark.parametrize("text, expected", [
    (".", {"local_path": ".", "url": None, "path": "."}),
    ("../lib:/workflow/lib", {"local_path": "../lib", "url": None, "path": "/workflow/lib"}),
    ("https://github.com/org/repo.git", {"local_path": None, "url": "https://github.com/org/repo.git", "path": "."}),
    ("git@github.com:org/repo.git:/repo", {"local_path": None, "url": "git@github.com:org/repo.git", "path": "/repo"}),
])
def test_repo_shorthand(text, expected):
    repo = config(f"repos:\n  - '{text}'\n").repos[0]
    assert {k: getattr(repo, k) for k in expected} == expected
    assert repo.if_exists == "error"


def test_repo_rules():
    assert problems("repos: [a, b]\n") == [("repos", 4, "A maximum of one repo is currently supported")]
    assert problems("repos:\n  - {local_path: a, url: 'https://h/r'}\n")[0][2] == (
        "`local_path` and `url` are mutually exclusive")
    assert problems("repos:\n  - {branch: main}\n")[0][2] == "Either `local_path` or `url` must be specified"
    assert problems("repos:\n  - {url: 'https://h/r', path: '~bob/x'}\n")[0][2] == (
        "`~username` syntax is not supported")
    assert problems("repos:\n  - {url: 'https://h/r', if_exists: overwrite}\n")[0][0] == "repos[0].if_exists"


# --- user, shell, docker, durations


@pytest.mark.parametrize("value", ["ubuntu", "1000", "1000:1000", "app:staff", 1000])
def test_user_formats(value):
    assert config(f"user: {value}\n").user == str(value)


@pytest.mark.parametrize("value, problem", [
    ("'a:b:c'", "too many parts"), ("':x'", "empty user name or id"), ("'a:'", "empty group name or id"),
    ("'-1'", "negative id"),
])
def test_user_errors(value, problem):
    assert problems(f"user: {value}\n") == [
        ("user", 4, f"invalid user format: {problem} (expected `name_or_uid[:group_or_gid]`)")]


def test_shell_values_and_defaults():
    assert config("shell: sh\n").shell == "sh"
    assert config("shell: /usr/bin/zsh\n").shell == "/usr/bin/zsh"
    assert problems("shell: zsh\n") == [("shell", 4, "The value must be `sh`, `bash`, or an absolute path")]
    assert (shell_path(None, image=False), shell_path(None, image=True)) == ("/bin/bash", "/bin/sh")
    assert (shell_path("sh", image=False), shell_path("/bin/dash", image=True)) == ("/bin/sh", "/bin/dash")


def test_docker_excludes_image_and_python():
    text = "type: service\nport: 8000\nimage: busybox\ndocker: true\n"
    assert [(p.path, p.message) for p in errors(text).problems] == [
        ("docker", "`image` and `docker` are mutually exclusive fields")]
    assert [p.message for p in errors(BASE + "python: '3.12'\ndocker: true\n").problems] == [
        "`python` and `docker` are mutually exclusive fields"]
    assert config("docker: true\n").docker is True


@pytest.mark.parametrize("value, expected", [
    ("off", "off"), ("false", "off"), ("true", None), ("90", 90), ("5m", 300), ("2h", 7200), ("1d", 86400)])
def test_offable_durations(value, expected):
    c = config(f"stop_duration: {value}\nmax_duration: {value}\n")
    assert (c.stop_duration, c.max_duration) == (expected, expected)


def test_duration_errors_name_the_field():
    assert problems("max_duration: soon\n") == [
        ("max_duration", 4, "Invalid duration `soon` (expected seconds or e.g. `30s`, `5m`, `1h`)")]


def test_defaults_and_flags():
    c = config("")
    assert (c.volumes, c.files, c.repos, c.user, c.shell, c.privileged, c.docker, c.dstack, c.strip_prefix) == (
        [], [], [], None, None, False, None, False, True)
    c = config("strip_prefix: false\ndstack: true\nprivileged: true\nsingle_branch: false\n")
    assert (c.strip_prefix, c.dstack, c.privileged, c.single_branch) == (False, True, True, False)


def test_honoured_fields_are_not_reported_as_ignored():
    honoured = {"volumes", "files", "repos", "user", "shell", "privileged", "docker", "strip_prefix",
                "stop_duration", "max_duration", "single_branch"}
    assert not honoured & set(IGNORED_FIELDS)
    loaded = load(BASE + "volumes: [/a:/b]\nprivileged: true\nstrip_prefix: false\nstop_duration: 1m\n")
    assert loaded.warnings == []
    assert "`nvcc` is ignored on Ray" in load(BASE + "nvcc: true\n").warnings[0]


def test_colons_are_refused_in_mount_and_file_paths():
    assert problems("volumes:\n  - {instance_path: '/a:b', path: /x}\nfiles:\n  - {local_path: a, path: 'x:y'}\n") == [
        ("volumes[0].instance_path", 5, "`:` is not allowed in a mount path: /a:b"),
        ("files[0].path", 7, "`:` is not allowed in a file's path: x:y"),
    ]


@pytest.mark.parametrize("url", ["https://bob:tok@github.com/org/r.git", "https://ghp_token@github.com/org/r.git",
                                 "ssh://git:pw@host/r.git"])
def test_a_repo_url_with_credentials_is_refused(url):
    [(path, _, message)] = problems(f"repos:\n  - {{url: '{url}'}}\n")
    assert path == "repos[0].url" and message.startswith("`url` must not carry credentials")
    assert "tok" not in message and "pw" not in message


@pytest.mark.parametrize("url", ["git@github.com:org/r.git", "ssh://git@host/r.git", "https://github.com/o/r.git",
                                 "file:///srv/r.git"])
def test_repo_urls_without_credentials(url):
    assert config(f"repos:\n  - {{url: '{url}'}}\n").repos[0].url == url
