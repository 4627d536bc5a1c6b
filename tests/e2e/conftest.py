"""What the whole-system tests share: one real agent serving the demo model to the test's plane, and the strict
SDK client against it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import RunningPlane
from tests.support.served_nodes import Nodes, one_node, strict_client


@pytest.fixture
def served(plane: RunningPlane, tmp_path: Path) -> Iterator[Nodes]:
    """One agent serving the demo model for org `acme` of `plane`, with an API key of that org."""
    with one_node(plane, tmp_path) as nodes:
        yield nodes


@pytest.fixture
def client(served: Nodes) -> Iterator[openai.OpenAI]:
    """The SDK checking every answer against its own models, past the plane's cache."""
    with strict_client(served) as client:
        yield client
