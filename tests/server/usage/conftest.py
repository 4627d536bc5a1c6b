"""What the usage tests share: a migrated SQLite database of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.storage.db import make_engine, migrate


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "usage.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    yield path
