"""Auto-pipelining: the Lua script calls made in one event-loop turn go to Redis as one pipeline round trip.

Under load a plane makes several script calls for every request (cache lookup, admission, settlement, store),
and what they cost the plane is redis-py's work per command (a pooled connection taken and given back, the
command packed, its reply read, an await each), not Redis's. Calls that become ready in the same turn of the
event loop (the requests whose bytes one poll of the sockets returned) are queued here and sent together:
one connection, one write, the replies read back in order.

A lone call is not held back: the batch is sent by a task that starts in the loop's next turn, which does not
wait for I/O when there is work ready, so it costs one loop step, never a timer (and a batch of one is a plain
EVALSHA, no pipeline). A batch holds at most
`MAX_BATCH` calls; the next call starts another, sent in parallel on another pooled connection.

Each call keeps the semantics of a lone EVALSHA (as server.shared.redis_limits.Script had them):

    its reply          its own, or its own exception (a script that failed raises for that call alone)
    NoScriptError      a Redis restarted or SCRIPT FLUSHed since the load: the script is loaded again, once,
                       and the calls that missed it are sent again (together)
    connection errors  the batch's round trip failed: every call of it raises that error, as each alone would
                       have (redis-py's one retry on a fresh connection is the pipeline's too)

There is one batcher per client (`batcher_for`), so the limiter and the cache, which share one, share the
round trips too.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

# Calls sent in one round trip at most: Redis runs them one after another, so a huge batch would make its
# first caller wait on the others' scripts (each ~10-100 us); 64 already spreads the client's cost thin.
MAX_BATCH = 64


@dataclass(slots=True, eq=False)  # calls are told apart by identity
class Call:
    """One EVALSHA waiting for its batch: the script's SHA1 and source (to load it again), keys, args."""

    sha: str
    source: str
    keys: Sequence[str]
    args: Sequence[Any]
    future: asyncio.Future[Any]


class Batcher:
    """Queues script calls and sends those of one loop turn as one `pipeline(transaction=False)`.

    `redis`: the client whose pool the pipelines use. `max_batch`: calls a round trip at most. Counted for
    operators and tests: `calls` sent, `round_trips` made (their ratio is the batching achieved).
    """

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = MAX_BATCH) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.calls = 0
        self.round_trips = 0
        # The batch the task already created will send; a new list once that task has taken it or it is full.
        self._queue: list[Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Batcher(calls={self.calls}, round_trips={self.round_trips}, sending={len(self._sending)})"

    async def evalsha(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA `sha` with `keys` and `args`, in this turn's batch; the script is loaded from `source` if
        Redis does not hold it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append(Call(sha, source, keys, args, future))
        if len(queue) == 1:
            # The first call of a batch starts the task that sends it: its first step runs in the next loop
            # turn, after every callback ready in this one (which may add their calls) and a poll that does
            # not wait, since that step is ready.
            task = loop.create_task(self._send(queue))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        if len(queue) >= self.max_batch:
            self._queue = []  # full: the next call starts another
        return await future

    async def _send(self, batch: list[Call]) -> None:
        if self._queue is batch:
            self._queue = []  # calls from here on go to the next batch
        missed = await self._answer(batch)
        if missed:
            # Load each missing script once, then send its calls again, together. A second miss (flushed again
            # in between) is that call's error, as it was a lone call's.
            try:
                for source in {call.sha: call.source for call in missed}.values():
                    await self.redis.script_load(source)
            except asyncio.CancelledError:
                _cancel(missed)
                raise
            except Exception as exc:  # as a lone call's load would have failed
                _fail(missed, exc)
                return
            await self._answer(missed, last=True)

    async def _answer(self, calls: list[Call], *, last: bool = False) -> list[Call]:
        """Send `calls` in one round trip and resolve their futures; the calls whose script Redis did not hold,
        left unresolved (unless `last`)."""
        try:
            replies = await self._round_trip(calls)
        except asyncio.CancelledError:  # the loop is closing
            _cancel(calls)
            raise
        except Exception as exc:  # the round trip failed: every call of it does, as a lone call would
            _fail(calls, exc)
            return []
        missed = []
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():
                continue  # its caller was cancelled: the call still ran, as a lone call sent would have
            if isinstance(reply, NoScriptError) and not last:
                missed.append(call)
            elif isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)
        return missed

    async def _round_trip(self, calls: list[Call]) -> list[Any]:
        """The replies, in order; a script's error (ResponseError) stands in its call's place."""
        self.round_trips += 1
        self.calls += len(calls)
        if len(calls) == 1:
            # Alone (a quiet plane): a plain command, cheaper than a pipeline of one.
            call = calls[0]
            try:
                return [await self.redis.evalsha(call.sha, len(call.keys), *call.keys, *call.args)]
            except ResponseError as exc:
                return [exc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.sha, len(call.keys), *call.keys, *call.args)
            return await pipe.execute(raise_on_error=False)


def _fail(calls: list[Call], exc: Exception) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)


def _cancel(calls: list[Call]) -> None:
    for call in calls:
        call.future.cancel()


# Keyed by the client (its identity): whoever calls scripts on the same client shares its batches.
_BATCHERS: weakref.WeakKeyDictionary[aioredis.Redis, Batcher] = weakref.WeakKeyDictionary()


def batcher_for(redis: aioredis.Redis) -> Batcher:
    """The batcher of `redis`'s calls, made on first use."""
    batcher = _BATCHERS.get(redis)
    if batcher is None:
        batcher = _BATCHERS[redis] = Batcher(redis)
    return batcher
