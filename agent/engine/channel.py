"""One job's link between its worker thread and the event loop, which batches the generated text (`_Channel`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import tools
from agent.engine.errors import EngineError
from agent.engine.jobs import End, Result, Text
from agent.sampling import TokenLogprob
from agent.tools import ToolCallDelta

# A batch whose deadline is this close is handed over rather than waited for: timers are not that precise.
_TIMER_SLACK_S = 0.001
# The longest generation waits for the first token to leave (Job.first_sent).
FIRST_HOLD_S = 0.02


_Item = Text | End | Result | EngineError | None  # None: the worker thread is done
# text, its tokens' logprobs, its choice, tool-call fragments after it
_Piece = tuple[str, tuple[TokenLogprob, ...], int, tuple[ToolCallDelta, ...]]


class _Channel:
    """One job's link between its worker thread and the event loop: events for the consumer arrive on `queue`.

    The worker thread adds generated text with `text()` and ends with `send()`. Text is batched as `Job` describes:
    the first piece at once, later ones once the oldest waiting piece is `batch_s` old or `batch_max` pieces wait.
    After a hand-over the loop looks again on a timer of its own (a tick) when the next batch should be due: `batch_s`
    plus the lead its first piece had on the last batch (about one token). A steady generation thus wakes nothing
    across threads and the loop once per batch, with the batches it had when the worker woke the loop for each
    batch's first piece and the loop then set a timer for its deadline: that cost the worker a system call and the
    loop a second wake-up per batch (bench/results/node-path.md), each taken from llama.cpp's threads on a machine
    whose cores they keep busy. A piece that finds no tick pending (the first, or the first after a tick found
    nothing) wakes the loop, as does a full batch.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cancel: threading.Event,
        batch_s: float = 0.0,
        batch_max: int = 1,
        first_sent: threading.Event | None = None,
    ) -> None:
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.cancel = cancel
        self.abandoned = threading.Event()
        self._loop = loop
        self._batch_s = max(0.0, batch_s)
        self._batch_max = max(1, batch_max)
        # A tick this close to a batch's deadline hands it over: a second wake-up for a few ms is not worth it.
        self._early_s = max(_TIMER_SLACK_S, self._batch_s / 10)
        self._first_sent = first_sent  # the worker's alone: cleared once waited for
        self._lock = threading.Lock()  # guards what the worker thread and the loop share: the three below
        self._pieces: list[_Piece] = []
        self._oldest = 0.0  # when the first of _pieces came (time.monotonic)
        self._due = False  # the loop will look at _pieces without being woken: a wake-up is queued or a tick set
        # The loop's alone, like _timer: when it last handed text over (None: not yet), how long after that the
        # first piece of the next batch came, and whether a tick found nothing since.
        self._handed_at: float | None = None
        self._lead = 0.0
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.abandoned.is_set()

    def text(
        self,
        piece: str,
        logprobs: tuple[TokenLogprob, ...] = (),
        choice: int = 0,
        tool_calls: tuple[ToolCallDelta, ...] = (),
    ) -> None:
        """From the worker thread: generated text, handed over with the batch it falls in."""
        with self._lock:
            if not self._pieces:
                self._oldest = time.monotonic()
            self._pieces.append((piece, logprobs, choice, tool_calls))
            wake = not self._due or len(self._pieces) == self._batch_max
            self._due = True
        if wake:
            self._call(self._look)
        if self._first_sent is not None:
            self._first_sent.wait(FIRST_HOLD_S)
            self._first_sent = None

    def send(self, item: _Item) -> None:
        """From the worker thread: the job's last events (its outcome, then None), after any text still waiting."""
        self._call(self._finish, item)

    def _look(self) -> None:
        """On the loop, woken by the worker or by a tick: hand the waiting pieces over if their batch is complete (and
        tick again when the next one should be), else look again at its deadline; without pieces, stop ticking."""
        self._stop_timer()
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            pieces, oldest = self._pieces, self._oldest
            if pieces and self._handed_at is not None and len(pieces) < self._batch_max:
                wait = oldest + self._batch_s - now
            if wait > self._early_s:
                pieces = []  # not due yet
            else:
                self._pieces = []
                wait = 0.0
            # Waiting pieces, or pieces handed over now (a steady generation): the next ones find a tick pending.
            # None (a pause, or the end coming): the next piece wakes the loop.
            self._due = tick = (wait > 0 or bool(pieces)) and self._batch_s > 0
        if pieces:
            # After a pause the first piece's lead on the last hand-over is the pause, not a token: start from none.
            last = None if self._paused else self._handed_at
            self._lead = 0.0 if last is None else min(max(oldest - last, 0.0), self._batch_s)
            self._handed_at, self._paused = now, False
            self._hand_over(pieces)
            wait = self._batch_s + self._lead
        elif not tick:
            self._paused = True
        if tick:
            self._timer = self._loop.call_later(wait, self._look)

    def _finish(self, item: _Item) -> None:
        self._stop_timer()
        with self._lock:
            pieces, self._pieces = self._pieces, []
            self._due = True  # nothing more is coming
        if pieces:
            self._hand_over(pieces)
        self.queue.put_nowait(item)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_over(self, pieces: list[_Piece]) -> None:
        # One Text per choice: the choices of `n` are generated one after another, so a batch spans two at most.
        for choice, run in itertools.groupby(pieces, key=lambda piece: piece[2]):
            texts, logprobs, _, calls = zip(*run, strict=True)
            # A choice's content all comes before its first call: the text, then the calls, keep their order.
            merged = tuple(tools.merge(sum(calls, ())))
            self.queue.put_nowait(Text("".join(texts), len(texts), sum(logprobs, ()), choice, merged))

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the loop closed under an abandoned job, and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)
