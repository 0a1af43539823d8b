"""Reading the HAProxy configuration Serve generates: its sections, its backends' route prefixes and servers.

What the wrapper's additions (haproxy_v1.py, engine_path.py, prefix_affinity.py) read from Serve's file, in one
place. Pure, standard library only: the wrapper runs on every reload.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_ACL = re.compile(r"^\s+acl is_(\S+) path (\S+)\s*$")  # Serve's exact-path ACL of a backend's route prefix
_SERVER = re.compile(r"^\s+server (\S+) (\S+)(.*)$")


@dataclass(frozen=True)
class Server:
    """One `server` line of a backend."""

    name: str
    address: str  # host:port
    options: str  # the rest of the line (`check`, `backup`, `observe ...`)

    @property
    def backup(self) -> bool:
        """Serve's fallback to its own proxy, not a replica."""
        return re.search(r"\sbackup\b", self.options) is not None

    @property
    def checked(self) -> bool:
        return re.search(r"\scheck\b", self.options) is not None


def sectioned(config: str) -> Iterator[tuple[str, str]]:
    """Each line of `config` with the header of the section it belongs to (`frontend http_frontend`, ...)."""
    section = ""
    for line in config.split("\n"):
        if line and not line[0].isspace():
            section = line.strip()
        yield section, line


def backend_prefixes(config: str) -> dict[str, str]:
    """Route prefix → Serve's backend for it, from the frontend's exact-path ACLs (`acl is_<backend> path <prefix>`)."""
    return {m.group(2): m.group(1) for line in config.split("\n") if (m := _ACL.match(line))}


def section_backend(section: str) -> str | None:
    """The backend a section header names (`backend <name>`), or None for any other section."""
    words = section.split()
    return words[1] if len(words) > 1 and words[0] == "backend" else None


def server_of(line: str) -> Server | None:
    """The `server` a line declares, or None."""
    m = _SERVER.match(line)
    return Server(m.group(1), m.group(2), m.group(3)) if m else None


def backend_servers(config: str) -> dict[str, list[Server]]:
    """Each backend → its `server` lines, in the file's order (backends without one are left out)."""
    servers: dict[str, list[Server]] = {}
    for section, line in sectioned(config):
        if (backend := section_backend(section)) is not None and (server := server_of(line)) is not None:
            servers.setdefault(backend, []).append(server)
    return servers
