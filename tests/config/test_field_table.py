"""README's table of dstack's service fields is the one generated from the models (it cannot drift)."""

from __future__ import annotations

from pathlib import Path

from ray_dstack.config.field_table import BEGIN, END, table, with_table
from ray_dstack.config.models.groups import ReplicaGroup
from ray_dstack.config.models.service import IGNORED_FIELDS, ServiceConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_has_the_generated_table():
    text = README.read_text()
    assert BEGIN in text and END in text
    assert with_table(text) == text, "README's field table is stale: python -m ray_dstack.config.field_table --write"


def test_every_field_of_the_models_has_a_row():
    rows = table().splitlines()
    for name in ServiceConfig.model_fields:
        if name not in IGNORED_FIELDS:
            assert any(row.startswith(f"| `{name}` |") for row in rows), name
    for name in ReplicaGroup.model_fields:
        if name not in IGNORED_FIELDS:
            assert any(row.startswith(f"| `groups[].{name}` |") for row in rows), name
    assert all(f"`{name}`" in rows[-1] for name in IGNORED_FIELDS)
    assert all(row.count(" | ") >= 1 and row.endswith("|") for row in rows[2:])
