"""Malformed and hostile `.dstack.yml` files: every one is refused with exit code 2 and a message.

A corpus of hand-written files (wrong types, huge numbers, deep nesting, YAML bombs, binary junk, unicode,
...) plus files generated with hypothesis (random YAML values put into every field of a valid service, random
top-level documents, random bytes). `ray-dstack plan FILE` must answer each with exit code 2, an
`error: ...` message, no traceback, and promptly (no hang). A sample goes through the console script as a
subprocess; everything goes through `ray_dstack.cli.main.main([...])` in-process.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_dstack.cli.main import main

BIN = Path(sys.executable).parent
VALID = """type: service
name: ok
commands:
  - python -m http.server 8000
port: 8000
"""
MAX_SECONDS = 5.0


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["type: service", "port: 8000", "a0: &a0 [" + ",".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\ncommands: *a{levels - 1}\n"


def _bomb_in(field: str) -> str:
    """A billion-laughs bomb whose expansion lands in `field` (where a message would print the value)."""
    body = _bomb().rsplit("\n", 2)[0]
    return body + f"\ncommands: [x]\n{field}: *a8\n"


# name → file content (str, or bytes for encodings/binary). Each is invalid for a different reason.
CORPUS: dict[str, str | bytes] = {
    "empty": "",
    "only-comment": "# nothing here\n",
    "null-doc": "~\n",
    "scalar-doc": "just a string\n",
    "list-doc": "- type: service\n- port: 8000\n",
    "int-doc": "42\n",
    "no-type": "port: 8000\ncommands: [x]\n",
    "wrong-type": VALID.replace("type: service", "type: task"),
    "type-is-list": VALID.replace("type: service", "type: [service]"),
    "type-is-map": VALID.replace("type: service", "type: {service: 1}"),
    "missing-port": "type: service\ncommands: [x]\n",
    "port-string": VALID.replace("port: 8000", "port: eighty"),
    "port-huge": VALID.replace("port: 8000", "port: 99999999999999999999999999999999999999"),
    "port-negative": VALID.replace("port: 8000", "port: -1"),
    "port-float-inf": VALID.replace("port: 8000", "port: .inf"),
    "port-nan": VALID.replace("port: 8000", "port: .nan"),
    "port-1e400": VALID.replace("port: 8000", "port: 1e400"),
    "port-map": VALID.replace("port: 8000", "port: {a: 1}"),
    "commands-map": VALID.replace("commands:\n  - python -m http.server 8000", "commands: {a: b}"),
    "commands-int-list": VALID.replace("  - python -m http.server 8000", "  - 1\n  - [2]"),
    "replicas-huge": VALID + "replicas: 10000000000000000000000000000000..1e500\n",
    "replicas-reversed": VALID + "replicas: 5..1\n",
    "replicas-junk": VALID + "replicas: 1..2..3\n",
    "replicas-zero": VALID + "replicas: 0\n",
    "scaling-no-range": VALID + "scaling: {metric: rps, target: 10}\n",
    "scaling-nan": VALID.replace("port: 8000", "port: 8000\nreplicas: 1..2") + "scaling: {metric: rps, target: .nan}\n",
    "scaling-window-huge": VALID.replace("port: 8000", "port: 8000\nreplicas: 1..2")
    + "scaling: {metric: rps, target: 1, window: 99999999999999999999999999d}\n",
    "resources-gpu-junk": VALID + "resources: {gpu: 'H100:9999999999999999999999:80GB..1GB'}\n",
    "resources-gpu-unicode": VALID + "resources: {gpu: 'Ｈ１００'}\n",
    "resources-memory-negative": VALID + "resources: {memory: -5GB}\n",
    "resources-memory-huge": VALID + "resources: {memory: 1e308TB}\n",
    "resources-cpu-list": VALID + "resources: {cpu: [1, 2, [3]]}\n",
    "resources-disk-weird": VALID + "resources: {disk: '∞GB'}\n",
    "env-bad-key": VALID + "env: ['1BAD=x']\n",
    "env-nested": VALID + "env: {A: {B: {C: [1, 2]}}}\n",
    "env-int-entry": VALID + "env: [1, 2, 3]\n",
    "env-unset-placeholder": VALID + "env: [RAY_DSTACK_FUZZ_SURELY_UNSET_VAR]\n",
    "env-scalar": VALID + "env: 12\n",
    "probes-junk": VALID + "probes: [{type: tcp, url: 'no-slash', interval: -1, ready_after: 0}]\n",
    "probe-interval-huge": VALID + "probes: [{url: /h, interval: 99999999999999999999999999999999w}]\n",
    "model-bad-format": VALID + "model: {name: m, format: grpc}\n",
    "model-empty-name": VALID + "model: {name: '', format: tgi}\n",
    "model-template-with-openai": VALID + "model: {name: m, format: openai, chat_template: '{{x}}'}\n",
    "model-list": VALID + "model: [a, b]\n",
    "name-invalid": VALID.replace("name: ok", "name: 'UPPER case!'"),
    "name-unicode": VALID.replace("name: ok", "name: 'сервис'"),
    "name-long": VALID.replace("name: ok", "name: " + "a" * 5000),
    "python-bad": VALID + "python: 2.7\n",
    "python-and-image": VALID + "python: '3.11'\nimage: ubuntu\n",
    "unknown-field": VALID + "frobnicate: true\n",
    "duplicate-keys": VALID + "port: 9000\n",
    "non-string-key": VALID + "1: one\n",
    "complex-key": VALID + "? [a, b]\n: c\n",
    "yaml-syntax": "type: service\nport: [8000\n",
    "yaml-tab-indent": "type: service\n\tport: 8000\n",
    "yaml-python-tag": VALID + "x: !!python/object/apply:os.system ['echo pwned']\n",
    "yaml-unknown-tag": VALID + "x: !vault |\n  abc\n",
    "yaml-undefined-alias": VALID + "x: *nothing\n",
    "yaml-bomb-commands": _bomb(),
    "yaml-bomb-type": _bomb_in("type"),
    "yaml-bomb-env": _bomb_in("env"),
    "yaml-bomb-python": _bomb_in("python"),
    "yaml-bomb-resources": _bomb_in("resources"),
    "yaml-bomb-map-keys": "type: service\nport: 8000\na: &a {k1: x, k2: x, k3: x, k4: x, k5: x, k6: x, k7: x, k8: x}\n"
    + "".join(f"b{i}: &b{i} {{" + ", ".join(f"k{j}: *{'a' if i == 0 else f'b{i - 1}'}" for j in range(9)) + "}\n"
              for i in range(8))
    + "env: *b7\ncommands: [x]\n",
    "yaml-recursive-alias": "type: service\nport: 8000\ncommands: &c [x, *c]\n",
    "deep-list": "type: service\nport: 8000\ncommands: " + "[" * 3000 + "]" * 3000 + "\n",
    "deep-map": "type: service\nport: 8000\nenv:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(1500)),
    "deep-flow-map": "type: service\nport: 8000\nresources: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n",
    "many-keys": VALID + "".join(f"extra{i}: {i}\n" for i in range(20000)),
    "huge-scalar": VALID + "frob: '" + "x" * 2_000_000 + "'\n",
    "many-documents": VALID + "---\n" + VALID,
    "binary-junk": bytes(range(256)) * 4,
    "nul-bytes": b"type: service\x00\nport: 8000\n",
    "latin1": "type: service\nport: 8000\nname: caf\xe9\n".encode("latin-1"),
    "utf16-bom": VALID.encode("utf-16"),
    "rtl-and-zero-width": VALID.replace("name: ok", "name: o\u200bk\u202e"),
    "emoji-everywhere": "type: service\nport: 8000\ncommands: ['🚀']\nenv: ['🔑=🗝']\n",
    "control-chars": "type: service\nport: 8000\ncommands: [\"\\x1b[2J\\x07\"]\nname: \"\\x00\"\n",
}

# The console-script sample: one of each family (subprocesses are ~1 s each).
SUBPROCESS_SAMPLE = [
    "empty", "scalar-doc", "no-type", "port-huge", "port-nan", "replicas-huge", "scaling-window-huge",
    "resources-gpu-junk", "env-nested", "probe-interval-huge", "model-bad-format", "name-long",
    "yaml-syntax", "yaml-python-tag", "yaml-bomb-commands", "yaml-bomb-type", "deep-list", "binary-junk",
    "utf16-bom", "control-chars",
]


def _write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / f"{name}.dstack.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def plan_in_process(path: Path) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["plan", str(path)])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue(), time.monotonic() - start


def assert_refused(code: int, stdout: str, stderr: str, elapsed: float, what: str) -> None:
    assert code == 2, f"{what}: exit {code}\nstdout: {stdout[:2000]}\nstderr: {stderr[:2000]}"
    assert "Traceback" not in stdout + stderr, f"{what}: traceback\n{stderr[:4000]}"
    assert stderr.startswith("error: ") and len(stderr.strip()) > len("error: "), f"{what}: no message: {stderr!r}"
    assert len(stderr) < 20_000, f"{what}: a {len(stderr)}-character message"
    assert elapsed < MAX_SECONDS, f"{what}: took {elapsed:.1f}s"


def test_the_corpus_is_big_enough():
    assert len(CORPUS) + GENERATED_EXAMPLES >= 100
    assert set(SUBPROCESS_SAMPLE) <= set(CORPUS) and len(SUBPROCESS_SAMPLE) >= 20


@pytest.mark.timeout(120)
def test_corpus_in_process(tmp_path):
    failures = []
    for name, content in CORPUS.items():
        code, out, err, elapsed = plan_in_process(_write(tmp_path, name, content))
        try:
            assert_refused(code, out, err, elapsed, name)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(180)
def test_corpus_sample_through_the_console_script(tmp_path):
    def run(name: str):
        path = _write(tmp_path, name, CORPUS[name])
        start = time.monotonic()
        try:
            proc = subprocess.run([str(BIN / "ray-dstack"), "plan", str(path)], capture_output=True, text=True,
                                  timeout=60, errors="replace")
        except subprocess.TimeoutExpired:
            return name, -1, "", "hang", 60.0
        return name, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, SUBPROCESS_SAMPLE))
    failures = []
    for name, code, out, err, elapsed in results:
        try:
            # A subprocess pays ~1 s of interpreter start-up on top of the work itself.
            assert_refused(code, out, err, max(0.0, elapsed - 10.0), name)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)


# --- generated -------------------------------------------------------------------------------------------

GENERATED_EXAMPLES = 150
FIELDS = ["name", "commands", "setup", "env", "port", "replicas", "scaling", "resources", "model", "probes",
          "auth", "python", "image", "working_dir", "registry_auth", "rate_limits", "backends", "type"]

_text = st.text(st.characters(codec="utf-8"), max_size=40)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), _text,
    st.sampled_from(["1..", "..", "0..0", "8000:8000", "1GB..", "-1", "1e999", "24GB:2", "A100", "5m", "rps",
                     "tgi", "{{ x }}", "${{ env.X }}", "..3", "100TB", "∞", ":", "0x10", "1_000"]),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.one_of(_text, st.integers()), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile_documents(draw) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "document", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "document":
        doc = draw(_junk)
        if isinstance(doc, dict) and doc.get("type") == "service":
            doc["type"] = "task"
        return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode("utf-8")
    doc = yaml.safe_load(VALID)
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True)):
        doc[field] = draw(_junk)
    # Always invalid (the junk alone may happen to be valid): an unknown field, with junk in it too.
    doc["zz_not_a_field_" + draw(st.text("abcxyz_", min_size=1, max_size=5))] = draw(_junk)
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode("utf-8")


@pytest.mark.timeout(300)
@settings(max_examples=GENERATED_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=hostile_documents())
def test_generated_documents_in_process(tmp_path, content):
    path = _write(tmp_path, "generated", content)
    code, out, err, elapsed = plan_in_process(path)
    assert_refused(code, out, err, elapsed, f"generated file {content[:300]!r}")
