"""What the routing tests share: the event-loop thread their scripted nodes (tests/support/hostile_agent) run on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.loop_thread import LoopThread


@pytest.fixture
def agent_loop() -> Iterator[LoopThread]:
    loop = LoopThread(timeout_s=60)
    yield loop
    loop.close()
