"""README's table of dstack's service fields and what each does on Ray, generated from the models.

    python -m ray_dstack.config.field_table            # print the table
    python -m ray_dstack.config.field_table --write    # replace it in README.md (between the markers)

tests/config/test_field_table.py fails when README's table is not what this prints, so it cannot drift from
the models: a new field, or a changed description, changes the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from ray_dstack.config.models.groups import ReplicaGroup
from ray_dstack.config.models.service import IGNORED_FIELDS, ServiceConfig

BEGIN = "<!-- fields:begin (python -m ray_dstack.config.field_table --write) -->"
END = "<!-- fields:end -->"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name in IGNORED_FIELDS:
            continue  # one row for all of them, below
        rows.append(f"| `{prefix}{name}` | {_cell(field.description or '')} |")
    return rows


def table() -> str:
    ignored = ", ".join(f"`{name}`" for name in IGNORED_FIELDS)
    lines = [
        "| field | on Ray |",
        "|---|---|",
        *_rows(ServiceConfig),
        *_rows(ReplicaGroup, "groups[]."),
        f"| {ignored} | dstack's cloud capacity and gateway: accepted, warned about, ignored (the Ray cluster "
        "decides) |",
    ]
    return "\n".join(lines)


def with_table(readme: str) -> str:
    """`readme` with the text between the markers replaced by the current table."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table() + "\n" + readme[end:]


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        path = Path(__file__).resolve().parents[2] / "README.md"
        path.write_text(with_table(path.read_text()))
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
