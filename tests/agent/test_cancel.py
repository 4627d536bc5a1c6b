"""A job cancelled while its prompt is evaluated stops within a chunk of it, against the real model (SmolLM2).

llama-cpp-python evaluates a whole prompt in one uninterruptible call: a client gone 0.5 s into a ~1,200-token prompt
left the slot busy for about 6 s on a 2-core machine. The engine evaluates a prompt in chunks and looks at the
cancel before each. These tests say so without a clock (a loaded machine stretches any time bound): the engine
stops at its first look after the cancel, and what it evaluated is less than the prompt, as the next request on the
slot shows by what it finds cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.engine import COMPLETIONS, End, Engine, Event, Job
from agent.models import ModelConfig
from server.config import Config
from tests.agent.conftest import SMOLLM2 as MODEL
from tests.agent.conftest import started
from tests.agent.test_engine import CancelAfterChecks
from tests.conftest import RunningPlane, abandon_request, eventually
from tests.support.agent_process import DEMO_MODEL
from tests.support.served_nodes import enrolling

LINES = " ".join(f"Line {n}: the river flows past the mill and the miller counts his sacks." for n in range(60))


def long_prompt(title: str) -> str:
    """About 1,200 tokens of SmolLM2's vocabulary (seconds of prompt evaluation on two cores), which share no
    prefix with those of another title: each test's prompt is evaluated from its start."""
    return f"{title}\n{LINES}"


class WatchedCancel(threading.Event):
    """A job's cancel that counts the engine's looks at it once it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.looks_after_set = 0

    def is_set(self) -> bool:
        answer = super().is_set()
        self.looks_after_set += answer
        return answer


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with started(ModelConfig(MODEL, name="smol", slots=1, context=2048, threads=2)) as engine:
        # A node that has served before: the very first decode also pages the weights in.
        asyncio.run(drain(engine, Job(COMPLETIONS, {"model": "smol", "prompt": "Warm up.", "max_tokens": 1})))
        yield engine


async def drain(engine: Engine, job: Job) -> list[Event]:
    return [event async for event in engine.generate(job)]


def busy(engine: Engine) -> int:
    return engine.status()[0].slots_busy


def long_job(title: str) -> Job:
    body = {"model": "smol", "prompt": long_prompt(title), "temperature": 0, "max_tokens": 4}
    return Job(COMPLETIONS, body)


async def cancel_after(engine: Engine, job: Job, delay_s: float) -> list[Event]:
    """Run `job`, set its cancel `delay_s` in; its events."""

    async def cancel() -> None:
        await asyncio.sleep(delay_s)
        job.cancel.set()

    canceller = asyncio.create_task(cancel())
    events = [event async for event in engine.generate(job)]
    await canceller
    return events


async def stopped_mid_prompt(engine: Engine, title: str) -> bool:
    """Whether the job before left less than `title`'s whole prompt evaluated in its slot: what the same prompt,
    sent again, finds cached."""
    end = (await drain(engine, long_job(title)))[-1]
    assert isinstance(end, End) and end.finish_reason == "length"
    return end.cached_tokens < end.prompt_tokens - 1


async def test_a_cancel_during_a_long_prompt_stops_within_a_chunk_and_frees_the_slot(engine: Engine) -> None:
    job = long_job("Cancelled")
    job.cancel = cancel = WatchedCancel()
    events = await cancel_after(engine, job, 0.3)
    assert len(events) == 1
    end = events[0]
    assert isinstance(end, End) and end.finish_reason == "cancelled"
    assert end.prompt_tokens > 1000 and end.completion_tokens == 0
    assert cancel.looks_after_set == 1  # stopped at the first look after the cancel: before the next chunk
    assert busy(engine) == 0
    assert await stopped_mid_prompt(engine, "Cancelled")


async def test_a_consumer_cancelled_during_a_long_prompt_frees_the_slot_at_once(engine: Engine) -> None:
    # A consumer that is itself cancelled (the agent shutting down, its job task cancelled) rather than the job.
    consumer = asyncio.create_task(anext(engine.generate(long_job("Abandoned"))))
    await asyncio.sleep(0.3)
    assert busy(engine) == 1 and not consumer.done()
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer  # the generator waits for its thread to let go of the slot before it gives up
    assert busy(engine) == 0
    assert await stopped_mid_prompt(engine, "Abandoned")


async def test_a_cancelled_prompt_leaves_what_it_evaluated_for_the_next_request(engine: Engine) -> None:
    job = long_job("Retried")
    # Set at the engine's fourth look: after the one before the slot is taken, and one before each of two chunks.
    job.cancel = CancelAfterChecks(3)
    cancelled = (await drain(engine, job))[-1]
    assert isinstance(cancelled, End) and cancelled.finish_reason == "cancelled"
    end = (await drain(engine, long_job("Retried")))[-1]
    assert isinstance(end, End) and end.finish_reason == "length"
    assert 0 < end.cached_tokens < end.prompt_tokens - 1  # the two chunks evaluated before the cancel


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    # Only the node's confirmation of the cancel can free the plane's slot here, never the timeout.
    return plane_config.replace(node_cancel_timeout_s=300.0)


def test_a_client_gone_during_a_long_prompt_frees_the_slot_once_the_node_confirms_the_cancel(
    plane: RunningPlane, tmp_path: Path
) -> None:
    with enrolling(plane, tmp_path) as nodes:
        nodes.started("node-a", "--context", "2048")
        session = next(iter(nodes.registry.sessions.values()))
        body = {"model": DEMO_MODEL, "prompt": long_prompt("Gone"), "max_tokens": 4, "temperature": 0}
        url = f"{plane.v1}/completions"
        client = threading.Thread(target=abandon_request, args=(url, body, nodes.key, 1.0))
        client.start()
        eventually(lambda: nodes.registry.busy_slots() == 1, what="the job to start")
        client.join(10)
        # The cancel goes to the node, which stops between chunks (the tests above) and says so: both the plane's
        # count and the node's own report say the slot is free again.
        eventually(lambda: nodes.registry.busy_slots() == 0, what="the node to confirm the cancel")
        eventually(lambda: session.status.models[0].slots_busy == 0, what="the node to report its slot free")
