"""`files` and local `repos` on the replica's side: read the archive `deploy` left in Ray's package store (the
GCS internal KV, as Ray's own `working_dir` packages: ray/_private/runtime_env/packaging.py) and unpack it.

The zip holds the entry's content at its root: a directory's files, or the one file of an `is_file` entry.
Entries may not leave the target (no `..`, no absolute names, no symbolic links) and keep their permission bits
(the executable bit of a script) from the zip's `external_attr`; set-id bits are dropped.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ray_dstack.errors import RayDstackError

CHUNK = 1 << 20


class FilesError(RayDstackError):
    """A replica could not put `volumes`, `files` or `repos` in place on its node."""


def read_package(uri: str, *, field: str, source: str) -> bytes:
    """The archive's bytes from the cluster's KV (this process must be connected to Ray: a replica is)."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        raise FilesError(f"{field}: {source!r} cannot be read: this process is not connected to a Ray cluster")
    data = internal_kv._internal_kv_get(uri)
    if data is None:
        raise FilesError(f"{field}: {source!r} ({uri}) is no longer in the cluster: deploy the service again")
    return data


def _entry_path(info: zipfile.ZipInfo, *, field: str, source: str) -> PurePosixPath:
    name = info.filename
    path = PurePosixPath(name)
    if "\\" in name or path.is_absolute() or ".." in path.parts:
        raise FilesError(f"{field}: the archive of {source!r} has an entry {name!r} outside its directory; "
                         "deploy the service again with ray-dstack")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise FilesError(f"{field}: the archive of {source!r} has a symbolic link {name!r}; links are not unpacked")
    return path


def _mode(info: zipfile.ZipInfo, default: int) -> int:
    return (info.external_attr >> 16) & 0o777 or default


def refuse_links(base: Path, path: Path, *, field: str) -> None:
    """Raise if `base`, or any existing directory between it and `path`, or `path`, is a symbolic link. What a
    replica writes as root into a volume or a directory a service can write must not follow a link the service
    planted there (it could point anywhere on the node)."""
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        raise FilesError(f"{field}: {path} is not inside {base}") from None
    current = base
    for part in ("", *parts):
        current = current / part if part else current
        if current.is_symlink():
            raise FilesError(f"{field}: {current} is a symbolic link; refusing to write through it")


class Unpacker:
    """Writes archives into node directories; `made` is called with every path it creates (for chown)."""

    def __init__(self, made: Callable[[Path], None]) -> None:
        self.made = made

    def makedirs(self, path: Path) -> None:
        missing = []
        while not path.exists() and not path.is_symlink():
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            directory.mkdir()
            self.made(directory)

    def _write(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
        if dest.is_symlink():  # never write through a link that was already there
            dest.unlink()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, archive.open(info) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
            os.fchmod(out.fileno(), _mode(info, 0o644))
        self.made(dest)

    def unpack(self, data: bytes, dest: Path, *, is_file: bool, field: str, source: str) -> None:
        """`dest`: the directory (or, with `is_file`, the file) on the node."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise FilesError(f"{field}: the archive of {source!r} is not a zip file") from None
        with archive:
            entries = [(info, _entry_path(info, field=field, source=source)) for info in archive.infolist()]
            if is_file:
                files = [info for info, _ in entries if not info.is_dir()]
                if len(files) != 1:
                    raise FilesError(f"{field}: the archive of {source!r} should hold one file, it holds {len(files)}")
                if dest.is_dir() and not dest.is_symlink():
                    raise FilesError(f"{field}: {source!r} is a file but its path {dest} is a directory")
                self.makedirs(dest.parent)
                self._write(archive, files[0], dest)
                return
            if dest.exists() and not dest.is_dir():
                raise FilesError(f"{field}: {source!r} is a directory but its path {dest} is a file")
            self.makedirs(dest)
            for info, path in entries:
                target = dest.joinpath(*path.parts)
                refuse_links(dest, target, field=field)  # a directory that already held links (a volume)
                if info.is_dir():
                    self.makedirs(target)
                    target.chmod(_mode(info, 0o755))
                    continue
                self.makedirs(target.parent)
                self._write(archive, info, target)
