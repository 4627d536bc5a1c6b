"""Which slot a job gets: the one that holds its conversation so far, against the real model (SmolLM2).

Each check reads the engine's own bookkeeping, `End.cached_tokens`: how many prompt tokens the slot already held.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.engine import CHAT, End, Engine, Job, Text
from agent.models import ModelConfig
from tests.agent.conftest import SMOLLM2 as MODEL
from tests.agent.conftest import started

# Two conversations whose system messages differ after their first sentence: each prompt is long enough that its
# cached prefix is unmistakable, and short enough to keep the test quick.
SHARED = "You are a helpful assistant. Answer in one short sentence."


def system(topic: str, facts: list[str]) -> dict[str, str]:
    return {"role": "system", "content": " ".join([SHARED, f"The user asks about {topic}.", *facts])}


A = system("rivers", [f"River {n} is {n * 7} kilometres long and flows into lake {n + 3}." for n in range(12)])
B = system("mountains", [f"Mountain {n} is {n * 300} metres high and was climbed in {1900 + n}." for n in range(12)])
C = system("cities", ["City 1 has a harbour."])


class Conversation:
    def __init__(self, engine: Engine, first: dict[str, str]) -> None:
        self.engine = engine
        self.messages: list[dict[str, str]] = [first]
        self.ends: list[End] = []

    async def say(self, text: str) -> End:
        self.messages.append({"role": "user", "content": text})
        body: dict[str, Any] = {"model": "smol", "messages": self.messages, "temperature": 0, "max_tokens": 12}
        pieces: list[str] = []
        end: End | None = None
        async for event in self.engine.generate(Job(CHAT, body)):
            if isinstance(event, Text):
                pieces.append(event.text)
            elif isinstance(event, End):
                end = event
        assert end is not None
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.ends.append(end)
        return end


@pytest.fixture
def engine() -> Iterator[Engine]:
    with started(ModelConfig(MODEL, name="smol", slots=2, context=2048, threads=2)) as engine:
        yield engine


async def test_interleaved_conversations_each_follow_up_lands_on_the_slot_holding_it(engine: Engine) -> None:
    a, b = Conversation(engine, A), Conversation(engine, B)
    for question in ("Which river is longest?", "And the shortest?", "Which lake does river 2 flow into?"):
        await a.say(question)
        await b.say(question)
    for conversation in (a, b):
        first, *follow_ups = conversation.ends
        assert first.cached_tokens < first.prompt_tokens // 4  # cold: at most the shared system sentence
        for previous, follow_up in zip(conversation.ends, follow_ups, strict=False):
            # The whole previous prompt was still there (its answer too, as far as the template renders it alike).
            assert follow_up.cached_tokens >= previous.prompt_tokens, (previous, follow_up)


async def test_a_new_conversation_takes_the_least_recently_used_slot(engine: Engine) -> None:
    a, b = Conversation(engine, A), Conversation(engine, B)
    await b.say("Which mountain is highest?")
    await a.say("Which river is longest?")
    await a.say("And the shortest?")  # a's slot is the one freed last; b's has waited longest
    newcomer = await Conversation(engine, C).say("Which city has a harbour?")
    assert newcomer.cached_tokens < newcomer.prompt_tokens // 2  # it shares only the first sentence with either
    again = await a.say("Which lake does river 2 flow into?")
    assert again.cached_tokens >= a.ends[-2].prompt_tokens


async def test_a_new_conversation_takes_an_unused_slot_before_any_cached_one(engine: Engine) -> None:
    a = Conversation(engine, A)
    await a.say("Which river is longest?")
    await Conversation(engine, C).say("Which city has a harbour?")
    again = await a.say("And the shortest?")
    assert again.cached_tokens >= a.ends[0].prompt_tokens


async def test_a_repeated_prompt_reuses_all_of_it_but_the_token_that_samples(engine: Engine) -> None:
    a = Conversation(engine, A)
    first = await a.say("Which river is longest?")
    a.messages = a.messages[:-2]  # the same question again, as a client retrying it would send it
    again = await a.say("Which river is longest?")
    assert again.prompt_tokens == first.prompt_tokens
    assert again.cached_tokens == first.prompt_tokens - 1
