"""Stopping `hatchway-agent run` from another thread (`STOP_SWITCH`): the Windows service host's "SIGTERM"."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class StopSwitch:
    """Lets another thread stop `hatchway-agent run` as SIGTERM would: the Windows service control handler runs
    on the SCM dispatcher's thread, where no signal reaches the agent's event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop: Callable[[], None] | None = None
        self._pressed = False

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        def stop() -> None:
            loop.call_soon_threadsafe(event.set)

        with self._lock:
            self._stop = stop
            pressed = self._pressed
        if pressed:
            event.set()

    def press(self) -> None:
        with self._lock:
            self._pressed = True
            stop = self._stop
        if stop is not None:
            stop()


STOP_SWITCH = StopSwitch()
