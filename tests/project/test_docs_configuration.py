"""docs/configuration.md documents every field of the plane's config model, the way the plane reads it.

The field list comes from the model itself (`Config`'s dataclass fields, `SETTINGS` for the environment, the
`serve` command for flags), so a setting added to the code without its row in the doc fails here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import click

from server.cli import serve
from server.config import SETTINGS, Config
from tests.conftest import REPO

DOC = REPO / "docs" / "configuration.md"
# What a cell says when a field has no environment variable or no flag.
NONE = ("", "—")


@dataclass(frozen=True)
class Row:
    environment: str
    flag: str
    default: str


def documented() -> dict[str, Row]:
    """The rows of the doc's settings table (the one whose header starts with `| setting |`), by setting name."""
    rows: dict[str, Row] = {}
    lines = iter(DOC.read_text().splitlines())
    for line in lines:
        if line.startswith("| setting |"):
            break
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if set(cells[0]) <= set("-: "):
            continue
        name, environment, flag, default = (cell.strip("`") for cell in cells[:4])
        rows[name] = Row(environment, flag, default)
    return rows


def model_fields() -> list[str]:
    return [spec.name for spec in dataclasses.fields(Config)]


def test_every_field_of_the_config_model_has_a_row() -> None:
    rows = documented()
    assert [name for name in model_fields() if name not in rows] == []


def test_every_row_names_a_field_of_the_config_model() -> None:
    assert [name for name in documented() if name not in model_fields()] == []


def test_each_row_names_the_environment_variable_the_plane_reads() -> None:
    rows = documented()
    environment = {setting.name: setting.env for setting in SETTINGS}
    wrong = [
        (name, row.environment)
        for name, row in rows.items()
        if (row.environment != environment[name] if name in environment else row.environment not in NONE)
    ]
    assert wrong == []


def test_each_row_names_the_serve_flag_that_sets_it() -> None:
    flags = {param.name: param.opts[0] for param in serve.params if isinstance(param, click.Option)}
    wrong = [
        (name, row.flag)
        for name, row in documented().items()
        if (row.flag != flags[name] if name in flags else row.flag not in NONE)
    ]
    assert wrong == []


def test_each_documented_default_loads_as_the_models_default() -> None:
    rows, defaults = documented(), Config()
    wrong: list[tuple[str, str]] = []
    for setting in SETTINGS:
        cell = rows[setting.name].default if setting.name in rows else "(no row)"
        if cell == "empty":
            matches = getattr(defaults, setting.name) == ""
        elif "`" not in cell and cell != "(no row)":
            loaded = Config.load(environ={setting.env: cell})
            matches = getattr(loaded, setting.name) == getattr(defaults, setting.name)
        else:
            matches = False
        if not matches:
            wrong.append((setting.name, cell))
    assert wrong == []
