"""`files` and a local `repos` entry: packed on the deploying machine into zips named by their content.

dstack tars each entry client-side, honouring `.gitignore` and `.dstackignore`, and refuses an archive over
2 MiB (`DSTACK_SERVER_CODE_UPLOAD_LIMIT`, 0 = unlimited). ray-dstack does the same with a zip, since Ray's package
store (the one `ray job submit --working-dir` uses) holds zips: `gcs://_ray_pkg_<sha256>.zip`
(ray_dstack/deploy/package_store.py uploads it; each replica unpacks it before its commands start).

- A relative `local_path` is relative to the configuration file's directory (`~` is the deploying user's home).
- The zip's root is the entry's content: a directory's files, or the one file under its own name.
- The ignore files of the entry's directories count, and those of the directories above it up to the git
  repository's root (the nearest with `.git`), else up to the configuration's directory (ignore_rules.py);
  `.git` at the entry's root is left out.
- Entries are sorted and carry a fixed timestamp and their file modes; symlinks are stored as what they point to
  (a zip extracted by Python's zipfile, as Ray's is, makes no links), a link that loops or dangles is skipped.
- The name is the SHA-256 of what the zip holds (names, modes, contents), not of its bytes: the same files give
  the same URI whatever zlib compressed them, so a redeploy without changes rolls nothing and a change rolls.
- The limit: `deploy/plan --upload-limit`, else `$RAY_DSTACK_UPLOAD_LIMIT`, else 2 MiB per archive; bytes or a
  size with a binary unit (`10MiB`, `512K`, `1G`); 0 = none, though Ray's dashboard takes at most 100 MiB per
  package (`DASHBOARD_CLIENT_MAX_SIZE`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ray_dstack.deploy.ignore_rules import ancestors, is_ignored
from ray_dstack.errors import UsageError
from ray_dstack.spec import UploadSpec

UPLOAD_LIMIT_ENV = "RAY_DSTACK_UPLOAD_LIMIT"
DEFAULT_UPLOAD_LIMIT = 2 * 1024**2
# Ray's dashboard refuses a request body over `ray_constants.DASHBOARD_CLIENT_MAX_SIZE` (100 MiB in Ray 2.60).
DASHBOARD_MAX_PACKAGE = 100 * 1024**2
URI_PREFIX = "gcs://_ray_pkg_"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can carry: every entry the same
_CHUNK = 1024 * 1024
_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class UploadError(UsageError):
    """An entry of `files`/`repos` that cannot be uploaded as it is (missing, over the limit): exit code 2."""


def parse_size(text: str) -> int:
    """Bytes from `2097152`, `2MiB`, `2M`, `1.5GB`, `512k` (binary units, case ignored)."""
    m = _SIZE_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(f"invalid size {text!r} (expected bytes or e.g. `10MiB`, `512K`, `1G`; 0 = no limit)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def upload_limit(cli_value: str | None = None) -> int:
    """The per-archive limit in bytes (0: none): `--upload-limit`, else $RAY_DSTACK_UPLOAD_LIMIT, else 2 MiB."""
    for where, value in (("--upload-limit", cli_value), (f"${UPLOAD_LIMIT_ENV}", os.environ.get(UPLOAD_LIMIT_ENV))):
        if value is not None and value.strip():
            try:
                return parse_size(value)
            except ValueError as exc:
                raise UsageError(f"{where}: {exc}") from None
    return DEFAULT_UPLOAD_LIMIT


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Packed:
    """One entry packed: its spec (URI, size, where it lands) and the zip's bytes."""

    spec: UploadSpec
    data: bytes


@dataclass(frozen=True)
class Entry:
    where: str  # `files[1]`, `repos[0]`: how messages name it
    source: str  # the local path as the configuration wrote it
    path: str  # where the replica puts it
    repo: bool
    if_exists: str = "error"


def entries(config: Any) -> list[Entry]:
    """`files` and the local `repos` entry of a configuration, in file order."""
    found = [Entry(f"files[{i}]", f.local_path, f.path if f.path is not None else f.local_path, False)
             for i, f in enumerate(getattr(config, "files", None) or [])]
    for i, repo in enumerate(getattr(config, "repos", None) or []):
        if getattr(repo, "local_path", None):
            found.append(Entry(f"repos[{i}]", repo.local_path, repo.path, True, repo.if_exists))
    return found


def pack_uploads(loaded: Any, limit: int) -> list[Packed]:
    """Pack every `files` entry and a local `repos` entry of a loaded configuration (`LoadedService`); an entry
    that is missing or packs over `limit` (0: no limit) raises UploadError naming it."""
    config_path = Path(loaded.path) if getattr(loaded, "path", None) else None
    config_dir = config_path.resolve().parent if config_path else Path.cwd()
    label = str(config_path) if config_path else "configuration"
    return [pack_entry(entry, config_dir, limit, label=label) for entry in entries(loaded.config)]


def pack_entry(entry: Entry, config_dir: Path, limit: int, *, label: str = "configuration") -> Packed:
    where = f"{label}: {entry.where}"
    root = Path(os.path.abspath(config_dir / Path(entry.source).expanduser()))
    if not root.exists():
        why = "a broken symlink" if root.is_symlink() else "no such file or directory"
        raise UploadError(f"{where}: {entry.source}: {why} ({root})")
    if entry.repo and not root.is_dir():
        raise UploadError(f"{where}: {entry.source} is not a directory ({root}): a local repo is a directory")
    budget = DASHBOARD_MAX_PACKAGE if limit <= 0 else min(DASHBOARD_MAX_PACKAGE, max(8 * limit, 16 * 1024**2))
    try:
        data, digest = pack(root, stop=_ignore_stop(root, config_dir), budget=budget)
    except _OverBudget:
        data, digest = b"", ""
    except OSError as exc:
        raise UploadError(f"{where}: {entry.source}: cannot read {exc.filename or root}: {exc.strerror}") from None
    shown = f"{format_size(len(data))}" if data else f"more than {format_size(budget)} packed"
    if (not data and 0 < limit < budget) or (data and 0 < limit < len(data)):
        raise UploadError(
            f"{where}: {entry.source} ({shown}) is over the {format_size(limit)} upload limit; set --upload-limit "
            f"or ${UPLOAD_LIMIT_ENV} (bytes or e.g. 10MiB; 0 = no limit), or leave files out with .gitignore or "
            ".dstackignore")
    if not data:
        raise UploadError(
            f"{where}: {entry.source} ({shown}) is over the {format_size(DASHBOARD_MAX_PACKAGE)} Ray's dashboard "
            "accepts per package; leave files out with .gitignore or .dstackignore, or put the data on a volume")
    spec = UploadSpec(uri=f"{URI_PREFIX}{digest}.zip", path=entry.path, source=entry.source, size=len(data),
                      is_file=not root.is_dir(), repo=entry.repo, if_exists=entry.if_exists)
    return Packed(spec=spec, data=data)


def _ignore_stop(root: Path, config_dir: Path) -> Path | None:
    """How far up ignore files count: the git repository's root, else the configuration's directory."""
    start = root if root.is_dir() else root.parent
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    if start == config_dir or config_dir in start.parents:
        return config_dir
    return None


class _OverBudget(Exception):
    pass


class _Budgeted(io.BytesIO):
    """The zip's buffer: packing stops once it outgrows `budget` (a huge entry is not read to the end)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.over = False

    def write(self, data: Any) -> int:
        if self.over:  # zipfile still closes its entry and archive on the way out: let it, keep nothing
            return len(data)
        written = super().write(data)
        if self.tell() > self.budget:
            self.over = True
            raise _OverBudget()
        return written


def pack(root: Path, *, stop: Path | None, budget: int) -> tuple[bytes, str]:
    """The zip of `root` (a directory's content, or the one file) and the SHA-256 hex of what it holds."""
    buffer = _Budgeted(budget)
    manifest = hashlib.sha256()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        if root.is_dir():
            outer = ancestors(root.parent, stop) if stop is not None and stop in root.parents else []
            items = _walk(root, [root, *outer], "", {os.path.realpath(root)}, os.path.realpath(root))
        else:
            items = iter([(root.name, root, False)])
        for arcname, path, is_dir in items:
            _add(archive, manifest, arcname, path, is_dir)
    return buffer.getvalue(), manifest.hexdigest()


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _walk(directory: Path, chain: list[Path], prefix: str, on_path: set[str],
          root: str) -> Iterator[tuple[str, Path, bool]]:
    """The entry's files. A symbolic link is packed as what it points to, but only when that stays inside the
    entry (`root`, real path): `files: [.]` must not carry `~/.aws` or `/` into the cluster through a link."""
    with os.scandir(directory) as it:
        found = sorted(it, key=lambda e: e.name)
    for entry in found:
        path = Path(entry.path)
        if not prefix and entry.name == ".git" and entry.is_dir(follow_symlinks=False):
            continue  # dstack's `!/.git/`: the repository itself never travels
        try:
            is_dir = entry.is_dir()
            if not is_dir and not entry.is_file():
                continue  # a dangling link, a socket, a fifo: nothing to copy
        except OSError:
            continue
        if is_ignored(path, is_dir, chain):
            continue
        if entry.is_symlink() and not _inside(os.path.realpath(path), root):
            continue
        arcname = prefix + entry.name
        if is_dir:
            real = os.path.realpath(path)
            if real in on_path:
                continue  # a link back up the tree: walking it would never end
            yield arcname + "/", path, True
            yield from _walk(path, [path, *chain], arcname + "/", on_path | {real}, root)
        else:
            yield arcname, path, False


def _add(archive: zipfile.ZipFile, manifest: Any, arcname: str, path: Path, is_dir: bool) -> None:
    mode = os.stat(path).st_mode
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
    info.create_system = 3  # unix: the high 16 bits of external_attr are the mode
    info.external_attr = (stat.S_IMODE(mode) | (stat.S_IFDIR if is_dir else stat.S_IFREG)) << 16
    manifest.update(f"{'d' if is_dir else 'f'}\0{arcname}\0{stat.S_IMODE(mode):o}\0".encode())
    if is_dir:
        info.external_attr |= 0x10  # MS-DOS directory flag
        archive.writestr(info, b"")
        manifest.update(b"\n")
        return
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size = os.stat(path).st_size  # lets zipfile pick zip64 for a file over 2 GiB before it writes
    content = hashlib.sha256()
    with open(path, "rb") as src, archive.open(info, "w") as dst:
        while chunk := src.read(_CHUNK):
            content.update(chunk)
            dst.write(chunk)
    manifest.update(content.hexdigest().encode() + b"\n")
