"""Archives as `deploy` packs them (ray_dstack/deploy/uploads.py), for the replica-side tests."""

from __future__ import annotations

import io
import stat
import zipfile


def zip_of(entries: dict[str, tuple[bytes, int]]) -> bytes:
    """A zip as `deploy` packs one (unix modes in external_attr); a name ending in `/` is a directory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, (content, mode) in entries.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            kind = stat.S_IFDIR if name.endswith("/") else stat.S_IFREG
            info.external_attr = (mode | kind) << 16
            archive.writestr(info, content)
    return buffer.getvalue()
