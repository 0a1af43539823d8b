"""dstack's `volumes`, `files` and `repos` on a replica's node, shared by the process and container runtimes.

prepare_files() puts everything in place on the node and returns the bind mounts still to be made: the process
runtime makes them in a mount namespace of the replica's own (ray_dstack/serve/runtime/enter.py), the container
runtime passes them as `-v`.

- `volumes`: `instance` is `instance_path` on the node (created when missing, as dstack does); a named volume is
  the directory `<volume root>/<name>` (volume_root()); of several names the first that exists, else the first,
  created.
- `repos` (a `url` cloned here, or a local directory `deploy` packed) first, then `files` (packed by `deploy`):
  dstack checks the repo out before it writes the files, so a file may replace one of the repo's.
- Where things land: a target inside a volume (or inside an earlier upload's mount) is written into that
  volume's directory, as the commands would see it; a target under `in_place_under` (a process replica's own
  workspace, seen by its commands at the same path) is written there; anything else is unpacked under
  `workspace` and becomes a mount.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray_dstack.serve.runtime import git_clone
from ray_dstack.serve.runtime.packages import FilesError, Unpacker, read_package, refuse_links
from ray_dstack.spec import DEFAULT_VOLUME_ROOT, VOLUME_ROOT_ENV, GitRepoSpec, MountSpec, ServiceSpec, UploadSpec

FALLBACK_VOLUME_ROOT = "~/.local/share/ray-dstack/volumes"
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

__all__ = ["FilesError", "Mount", "prepare_files", "volume_root", "VOLUME_ROOT_ENV"]


@dataclass(frozen=True)
class Mount:
    source: str  # absolute path on the node
    target: str  # absolute path as the commands see it
    read_only: bool = False
    is_file: bool = False
    field: str = "volumes"  # the configuration's field it comes from, for messages
    optional: bool = False  # an `instance` volume with `optional: true`: the replica may run without it

    def describe(self) -> dict:
        """For `ray-dstack status`."""
        return {"source": self.source, "target": self.target}


def _writable(path: Path) -> bool:
    """Whether `path` is, or could be created as, a directory this process writes in."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def volume_root() -> Path:
    """Where named volumes live on this node: $RAY_DSTACK_VOLUME_ROOT, else /var/lib/ray-dstack/volumes, else (not
    writable there) ~/.local/share/ray-dstack/volumes. Creates nothing."""
    configured = os.environ.get(VOLUME_ROOT_ENV)
    if configured:
        return Path(os.path.expanduser(configured))
    default = Path(DEFAULT_VOLUME_ROOT)
    return default if _writable(default) else Path(os.path.expanduser(FALLBACK_VOLUME_ROOT))


def _under(path: str, parent: str) -> str | None:
    """`path` relative to `parent` ("" when equal), or None when it is not inside it."""
    if path == parent:
        return ""
    prefix = parent.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


def _has_files(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


class _Layout:
    def __init__(self, workspace: Path, working_dir: str, in_place_under: Path | None,
                 log: Callable[[str], None], owner: tuple[int, int] | None) -> None:
        self.workspace = workspace
        self.working_dir = working_dir
        self.in_place_under = str(in_place_under) if in_place_under is not None else None
        self.log = log
        self.owner = owner
        self.mounts: list[Mount] = []
        self.unpacker = Unpacker(self.own)

    def own(self, path: Path) -> None:
        if self.owner is not None and os.geteuid() == 0:  # only root can give files away (rootless: as they are)
            os.lchown(path, *self.owner)

    def own_tree(self, root: Path) -> None:
        if self.owner is None:
            return
        self.own(root)
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                self.own(Path(directory, name))

    def target(self, path: str) -> str:
        """`path` as the commands see it: relative ones join the working directory."""
        return posixpath.normpath(posixpath.join(self.working_dir, os.path.expanduser(path)))

    def place(self, target: str, *, field: str, is_file: bool) -> tuple[Path, bool]:
        """Where `target` is written on the node, and whether that is a new mount's (empty) source."""
        best: tuple[Mount, str] | None = None
        for mount in self.mounts:
            rest = _under(target, mount.target)
            if rest is not None and (best is None or len(mount.target) > len(best[0].target)):
                best = (mount, rest)
        if best is not None:
            mount, rest = best
            if mount.is_file and rest:
                raise FilesError(f"{field}: {target} lies inside {mount.target}, which is a file ({mount.field})")
            dest = Path(mount.source, rest) if rest else Path(mount.source)
            refuse_links(Path(mount.source), dest, field=field)  # a volume's content is the service's to change
            return dest, False
        if self.in_place_under is not None and _under(target, self.in_place_under) is not None:
            return Path(target), False
        staged = self.workspace / f"{len(self.mounts)}-{field}"
        self.unpacker.makedirs(staged)
        source = staged / posixpath.basename(target) if is_file else staged
        self.mounts.append(Mount(str(source), target, is_file=is_file, field=field))
        return source, True

    def volume(self, spec: MountSpec) -> None:
        if spec.kind == "instance":
            source = Path(spec.instance_path or "")
            if not source.is_absolute():
                raise FilesError(f"volumes: instance_path {spec.instance_path!r} must be an absolute path")
            try:
                self.unpacker.makedirs(source)
            except OSError as exc:
                if spec.optional:
                    self.log(f"volumes: {source} could not be created on this node ({exc.strerror}); "
                             f"running without it at {spec.path} (optional)")
                    return
                raise FilesError(f"volumes: instance_path {source} cannot be created on this node: {exc.strerror}") from None
        else:
            source = self.named_volume(spec)
        self.mounts.append(Mount(str(source), posixpath.normpath(spec.path), is_file=source.is_file(), field="volumes",
                                 optional=spec.optional and spec.kind == "instance"))

    def named_volume(self, spec: MountSpec) -> Path:
        if not spec.names:
            raise FilesError(f"volumes: the volume at {spec.path} has no name")
        for name in spec.names:
            if not _VOLUME_NAME.fullmatch(name) or name in (".", ".."):
                raise FilesError(f"volumes: {name!r} is not a volume name (letters, digits, `_`, `.`, `-`)")
        root = volume_root()
        for name in spec.names:
            if (root / name).is_dir():
                return root / name
        path = root / spec.names[0]
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.unpacker.makedirs(path)
        except OSError as exc:
            raise FilesError(f"volumes: volume {spec.names[0]!r} cannot be created at {path}: {exc.strerror}; "
                             f"set ${VOLUME_ROOT_ENV} on the node to a writable directory") from None
        self.log(f"volumes: created volume {spec.names[0]!r} at {path}")
        return path

    def skip_repo(self, target: str, dest: Path, fresh: bool, if_exists: str, what: str) -> bool:
        """`if_exists` for a repo: True to leave the path as it is."""
        # A new mount's source is empty, but the node may have files where the mount goes (a process replica
        # sees the node's filesystem); a container's image is unknown here.
        existing = dest if not fresh else (Path(target) if self.in_place_under is not None else None)
        if existing is None or not _has_files(existing):
            return False
        if if_exists == "skip":
            self.log(f"repos: {target} already has files: {what} skipped (if_exists: skip)")
            if fresh:
                self.mounts.pop()
            return True
        raise FilesError(f"repos: {target} already has files (if_exists: error): {what} not put there; "
                         "set `if_exists: skip` to keep what is there")

    def git(self, repo: GitRepoSpec, timeout_s: float) -> None:
        target = self.target(repo.path)
        dest, fresh = self.place(target, field="repos", is_file=False)
        shown = git_clone.scrub_url(repo.url)
        if self.skip_repo(target, dest, fresh, repo.if_exists, f"cloning {shown}"):
            return
        self.unpacker.makedirs(dest)
        git_clone.clone(repo, dest, timeout_s=timeout_s)
        self.own_tree(dest)
        self.log(f"repos: cloned {shown} into {target}")

    def upload(self, upload: UploadSpec) -> None:
        field = "repos" if upload.repo else "files"
        target = self.target(upload.path)
        dest, fresh = self.place(target, field=field, is_file=upload.is_file)
        if upload.repo and self.skip_repo(target, dest, fresh, upload.if_exists, f"{upload.source!r}"):
            return
        data = read_package(upload.uri, field=field, source=upload.source)
        try:
            self.unpacker.unpack(data, dest, is_file=upload.is_file, field=field, source=upload.source)
        except OSError as exc:
            raise FilesError(f"{field}: {upload.source!r} cannot be unpacked into {target}: {exc}") from None
        self.log(f"{field}: {upload.source!r} ({upload.size} bytes) unpacked into {target}")


def prepare_files(spec: ServiceSpec, *, workspace: Path, working_dir: str, in_place_under: Path | None,
                  log: Callable[[str], None], owner: tuple[int, int] | None = None) -> list[Mount]:
    """Blocking (the runtime calls it in a thread). Resolves volumes (creating their directories), unpacks
    `uploads` and clones `git_repo` under `workspace` (a directory of this replica on the node), and returns
    the bind mounts still to be made, parents before what lies inside them. `working_dir`: where the commands
    start, as they see it (relative `path`s join it). `in_place_under`: a node directory the commands see at the
    same path (a process replica's own workspace): targets under it are written there directly, not mounted.
    None for containers (everything becomes a mount). `owner`: (uid, gid) to chown what was created for the
    commands. Raises FilesError naming the field."""
    layout = _Layout(workspace, working_dir, in_place_under, log, owner)
    field = "volumes"
    try:
        for volume in spec.volumes:
            if not posixpath.isabs(volume.path):
                raise FilesError(f"volumes: path {volume.path!r} must be an absolute path")
            layout.volume(volume)
        field = "repos"
        if spec.git_repo is not None:
            layout.git(spec.git_repo, spec.ready_timeout_s)
        for upload in sorted(spec.uploads, key=lambda u: not u.repo):  # the repo before the files
            field = "repos" if upload.repo else "files"
            layout.upload(upload)
    except OSError as exc:  # a directory of the replica's or a chown: the node's own problem, said plainly
        raise FilesError(f"{field}: {exc.filename or 'a path'} cannot be prepared on this node: {exc.strerror}") from None
    return sorted(layout.mounts, key=lambda m: m.target.rstrip("/").count("/"))
