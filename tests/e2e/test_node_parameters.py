"""OpenAI's sampling parameters on a node (agent.sampling), through a real plane and a real agent with the demo model,
read with the official openai SDK validating every response strictly."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest
from llama_cpp import Llama

from tests.agent.conftest import smollm2_path
from tests.support.agent_process import DEMO_MODEL
from tests.support.served_nodes import NO_CACHE

QUESTION = [
    {"role": "system", "content": "Answer the question."},
    {"role": "user", "content": "What is the capital of France?"},
]
STORY = [
    {"role": "system", "content": "You are a storyteller."},
    {"role": "user", "content": "Tell me a long story about a dragon."},
]
CAPITAL = "The capital of France is"
# Every request bypasses the plane's response cache: a seeded or greedy answer is cacheable, and these tests are
# about what the node generates.


@pytest.fixture(scope="module")
def vocabulary() -> Iterator[Llama]:
    llama = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def token_id(vocabulary: Llama, text: str) -> int:
    ids = vocabulary.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return int(ids[0])


@pytest.fixture
def lenient(client: openai.OpenAI) -> Iterator[openai.OpenAI]:
    """The client without strict validation, for the two legacy shapes the SDK's types leave out although OpenAI
    sends them: a stream chunk's `finish_reason: null`, and the nulls of an echoed prompt's first token."""
    with openai.OpenAI(base_url=str(client.base_url), api_key=client.api_key, default_headers=NO_CACHE) as lenient:
        yield lenient


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    params = {"model": DEMO_MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 12}
    whole = client.chat.completions.create(**params, logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(entry.token for entry in content) == choice.message.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        ranked = [top.logprob for top in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry.top_logprobs[0].token == entry.token and math.isclose(ranked[0], entry.logprob)

    chunks = list(client.chat.completions.create(**params, logprobs=True, top_logprobs=3, stream=True))
    streamed = [
        e for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content for e in ch.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    bare = client.chat.completions.create(**params, logprobs=True).choices[0].logprobs
    assert bare is not None and bare.content and all(entry.top_logprobs == [] for entry in bare.content)
    without = client.chat.completions.create(**params)
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == choice.message.content


def test_completion_logprobs_in_the_legacy_shape(client: openai.OpenAI, lenient: openai.OpenAI) -> None:
    completion = client.completions.create(model=DEMO_MODEL, prompt=CAPITAL, temperature=0, max_tokens=6, logprobs=2)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    # Offsets count from the start of the prompt, as OpenAI's do.
    offsets, at = [], len(CAPITAL)
    for token in logprobs.tokens:
        offsets.append(at)
        at += len(token)
    assert logprobs.text_offset == offsets
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert top is not None and token in top and top[token] == logprob
        assert 1 <= len(top) <= 3 and max(top.values()) == logprob  # greedy: the best one, listed once

    chunks = list(
        lenient.completions.create(
            model=DEMO_MODEL, prompt=CAPITAL, temperature=0, max_tokens=6, logprobs=2, stream=True
        )
    )
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.tokens for t in ch.logprobs.tokens]
    assert streamed == logprobs.tokens


def test_echo_with_max_tokens_zero_scores_the_prompt(lenient: openai.OpenAI) -> None:
    def score(prompt: str) -> openai.types.CompletionChoice:
        completion = lenient.completions.create(model=DEMO_MODEL, prompt=prompt, echo=True, max_tokens=0, logprobs=1)
        assert completion.usage is not None and completion.usage.completion_tokens == 0
        return completion.choices[0]

    paris = score(f"{CAPITAL} Paris")
    assert paris.text == f"{CAPITAL} Paris" and paris.finish_reason == "length"
    logprobs = paris.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == paris.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value is not None and value <= 0 for value in logprobs.token_logprobs[1:])
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert logprobs.text_offset[-1] == len(CAPITAL)  # " Paris" is the last token
    # The model knows its geography: " Paris" is far likelier than " Banana" after the same words, which score the
    # same in both prompts.
    banana = score(f"{CAPITAL} Banana").logprobs
    assert banana is not None and banana.token_logprobs is not None and banana.text_offset is not None
    words = len(logprobs.tokens) - 1
    assert banana.token_logprobs[1:words] == pytest.approx(logprobs.token_logprobs[1:words], abs=1e-3)
    assert banana.text_offset[words] == len(CAPITAL)
    assert logprobs.token_logprobs[-1] > sum(banana.token_logprobs[words:]) + 5


def test_echo_prefixes_the_completion_with_the_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=DEMO_MODEL, prompt=CAPITAL, echo=True, max_tokens=3, temperature=0)
    plain = client.completions.create(model=DEMO_MODEL, prompt=CAPITAL, max_tokens=3, temperature=0)
    assert completion.choices[0].text == CAPITAL + plain.choices[0].text


def test_n_choices_each_with_its_index_and_usage_counting_all(client: openai.OpenAI) -> None:
    params = {"model": DEMO_MODEL, "messages": STORY, "temperature": 1, "seed": 3, "max_tokens": 8}
    single = client.chat.completions.create(**params)
    whole = client.chat.completions.create(**params, n=2)
    assert [choice.index for choice in whole.choices] == [0, 1]
    assert all(choice.finish_reason == "length" and choice.message.content for choice in whole.choices)
    # Choice 0 samples with the request's seed, as a single answer does; choice 1 with the next one.
    assert whole.choices[0].message.content == single.choices[0].message.content
    assert whole.choices[1].message.content != whole.choices[0].message.content
    assert whole.usage is not None and single.usage is not None
    # The prompt once, the completion tokens of both choices: more than one choice's max_tokens, and billed so.
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (single.usage.prompt_tokens, 16)

    stream = client.chat.completions.create(**params, n=2, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = {0: "", 1: ""}
    finished = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {i: whole.choices[i].message.content for i in (0, 1)}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16

    completion = client.completions.create(model=DEMO_MODEL, prompt=CAPITAL, n=3, max_tokens=4, seed=1)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_the_same_seed_gives_the_same_text_and_another_seed_another(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model=DEMO_MODEL, messages=STORY, temperature=1, seed=seed, max_tokens=30
        )
        return answer.choices[0].message.content or ""

    first = sample(42)
    assert sample(42) == first
    assert sample(43) != first


def test_stop_ends_the_text_before_the_stop_string(client: openai.OpenAI) -> None:
    params = {"model": DEMO_MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "max_tokens": 12}
    full = client.completions.create(**params).choices[0].text
    assert " 8," in full
    stopped = client.completions.create(**params, stop=[" 8,", "never"]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (full[: full.index(" 8,")], "stop")


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, vocabulary: Llama) -> None:
    params = {"model": DEMO_MODEL, "prompt": CAPITAL, "temperature": 0, "max_tokens": 3}
    assert client.completions.create(**params).choices[0].text.startswith(" Paris")
    paris = token_id(vocabulary, " Paris")
    banned = client.completions.create(**params, logit_bias={str(paris): -100}, logprobs=0).choices[0]
    assert banned.logprobs is not None and " Paris" not in (banned.logprobs.tokens or [])
    forced = client.completions.create(**params, logit_bias={str(token_id(vocabulary, " banana")): 100})
    assert forced.choices[0].text.startswith(" banana")


def test_penalties_are_applied(client: openai.OpenAI) -> None:
    params = {"model": DEMO_MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "max_tokens": 16}
    plain = client.completions.create(**params).choices[0].text
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert client.completions.create(**params, **penalty).choices[0].text != plain


def test_an_unsupported_parameter_is_a_400_naming_it(client: openai.OpenAI) -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("completions", {"suffix": " and so on."}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ]
    for endpoint, extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            if endpoint == "chat":
                client.chat.completions.create(model=DEMO_MODEL, messages=QUESTION, max_tokens=2, extra_body=extra)
            else:
                client.completions.create(model=DEMO_MODEL, prompt=CAPITAL, max_tokens=2, extra_body=extra)
        assert caught.value.param == param, extra
        assert f"'{param}'" in caught.value.message
