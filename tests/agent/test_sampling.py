"""agent.sampling: the parameters it accepts and refuses, and its token loop against llama-cpp-python's own results
with the real SmolLM2 model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from llama_cpp import Llama

from agent import sampling
from agent.sampling import (
    RANDOM_SEED,
    InvalidParameter,
    PendingLogprobs,
    Sampling,
    StopScanner,
    TokenLogprob,
    echo_runs,
    parse,
    prompt_pieces,
    run_choice,
    score_prompt,
    token_bytes,
)
from tests.agent.conftest import smollm2_path

CHAT = "chat/completions"
COMPLETIONS = "completions"
PROMPT = "The capital of France is"


def parsed(endpoint: str = COMPLETIONS, **body: Any) -> Sampling:
    return parse(endpoint, body, lambda: 7)


def refused(endpoint: str = COMPLETIONS, **body: Any) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as caught:
        parsed(endpoint, **body)
    assert str(caught.value).startswith(f"'{caught.value.param}'")
    return caught.value


# --- parameters ---------------------------------------------------------------------------------------------------


def test_defaults_are_openai_s_and_llama_cpp_s() -> None:
    s = parsed()
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.n, s.seed) == (1.0, 1.0, 40, 0.05, 1, 7)
    assert (s.max_tokens, s.logprobs, s.echo, s.logit_bias, s.stop) == (None, None, False, (), ())


def test_logprobs_are_a_flag_and_a_count_on_chat_and_a_count_on_completions() -> None:
    assert parsed(CHAT, logprobs=True).logprobs == 0
    assert parsed(CHAT, logprobs=True, top_logprobs=5).logprobs == 5
    assert parsed(CHAT, logprobs=False).logprobs is None
    assert parsed(COMPLETIONS, logprobs=0).logprobs == 0
    assert parsed(COMPLETIONS, logprobs=3).logprobs == 3
    assert refused(CHAT, top_logprobs=2).param == "top_logprobs"
    assert refused(CHAT, logprobs=True, top_logprobs=21).param == "top_logprobs"
    assert refused(CHAT, logprobs=1).param == "logprobs"
    assert refused(COMPLETIONS, logprobs=True).param == "logprobs"
    assert refused(COMPLETIONS, top_logprobs=2).param == "top_logprobs"


def test_max_tokens_zero_only_on_completions() -> None:
    assert parsed(COMPLETIONS, max_tokens=0, echo=True).max_tokens == 0
    assert refused(CHAT, max_tokens=0).param == "max_tokens"
    assert refused(CHAT, max_completion_tokens=0).param == "max_completion_tokens"
    assert parsed(CHAT, max_completion_tokens=5, max_tokens=9).max_tokens == 5


def test_choices_and_best_of() -> None:
    assert parsed(n=3).n == 3
    assert parsed(n=3, best_of=3).n == 3
    assert refused(n=0).param == "n"
    assert refused(n=129).param == "n"
    assert refused(best_of=2).param == "best_of"  # more candidates than choices: not done here
    assert refused(n=3, best_of=2).param == "best_of"


def test_what_nodes_cannot_do_is_refused_by_name() -> None:
    assert refused(suffix=" the end").param == "suffix"
    assert parsed(suffix="").n == 1  # no suffix at all
    assert refused(CHAT, echo=True).param == "echo"
    assert refused(CHAT, suffix="x").param == "suffix"
    assert refused(CHAT, best_of=2).param == "best_of"
    assert parsed(CHAT, echo=False, best_of=1).echo is False


def test_logit_bias_maps_token_ids_and_bans_at_minus_100() -> None:
    s = parsed(logit_bias={"12": 5, "7": -100, "3": -2.5})
    assert s.logit_bias == ((12, 5.0), (7, -math.inf), (3, -2.5))
    assert refused(logit_bias={"x": 1}).param == "logit_bias"
    assert refused(logit_bias={"-1": 1}).param == "logit_bias"
    assert refused(logit_bias={"1": 101}).param == "logit_bias"
    assert refused(logit_bias={"1": True}).param == "logit_bias"
    assert refused(logit_bias=[1]).param == "logit_bias"
    with pytest.raises(InvalidParameter):
        sampling.check_for_model(s, vocabulary=12, prompt_tokens=1, context=100)
    sampling.check_for_model(s, vocabulary=13, prompt_tokens=1, context=100)


def test_logprobs_that_could_flood_the_plane_are_refused() -> None:
    small = parsed(logprobs=5, max_tokens=1000)
    sampling.check_for_model(small, vocabulary=100, prompt_tokens=10, context=4096)
    huge = parsed(logprobs=20, n=128)
    with pytest.raises(InvalidParameter) as caught:
        sampling.check_for_model(huge, vocabulary=100, prompt_tokens=10, context=32768)
    assert caught.value.param == "logprobs"


def test_seeds_never_mean_random_and_each_choice_has_its_own() -> None:
    assert parsed(seed=RANDOM_SEED).seed == 0
    assert parsed(seed=-1).seed == RANDOM_SEED - 1
    s = parsed(seed=RANDOM_SEED - 1)
    assert (s.seed_of(0), s.seed_of(1)) == (RANDOM_SEED - 1, 0)


def test_a_choice_never_runs_past_the_context() -> None:
    assert parsed(max_tokens=10).limit(prompt_tokens=100, context=105) == 5
    assert parsed().limit(prompt_tokens=100, context=105) == 5
    assert parsed(max_tokens=3).limit(prompt_tokens=100, context=1000) == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [("temperature", 2.5), ("top_p", "1"), ("presence_penalty", -3), ("frequency_penalty", 3), ("stop", [1])],
)
def test_values_out_of_range_are_refused_by_name(key: str, value: Any) -> None:
    assert refused(**{key: value}).param == key


# --- text and logprobs bookkeeping ---------------------------------------------------------------------------------


def test_stop_strings_are_found_across_pieces_and_held_back_until_known() -> None:
    scanner = StopScanner([". 3", "never"])
    assert scanner.feed("1. 2") == ("1. 2", False)
    assert scanner.feed(".") == ("", False)  # could start ". 3"
    assert scanner.feed(" ") == ("", False)
    assert scanner.feed("3 and more") == ("", True)
    scanner = StopScanner(["END"])
    assert scanner.feed("the E") == ("the ", False)
    assert scanner.feed("nd") == ("End", False)
    assert scanner.feed("E") == ("", False)
    assert scanner.flush() == "E"


def test_pending_logprobs_leave_with_the_text_their_tokens_begin_in() -> None:
    entries = [TokenLogprob(bytes([i]), -1.0) for i in range(4)]
    pending = PendingLogprobs()
    for start, entry in zip((0, 3, 3, 5), entries, strict=True):  # the third token begins where the second did
        pending.add(start, entry)
    assert pending.before(3) == (entries[0],)
    assert pending.before(4) == (entries[1], entries[2])
    assert pending.before(5) == ()
    assert pending.all() == (entries[3],)


def test_an_echo_goes_out_as_its_text_then_runs_of_logprobs() -> None:
    assert list(echo_runs("hi", None)) == [("hi", ())]
    entries = [TokenLogprob(b"x", -1.0)] * (sampling.ECHO_RUN_TOKENS + 1)
    runs = list(echo_runs("hi", entries))
    assert [(text, len(logprobs)) for text, logprobs in runs] == [("hi", sampling.ECHO_RUN_TOKENS), ("", 1)]


# --- the token loop with the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> Iterator[Llama]:
    model = Llama(model_path=str(smollm2_path()), n_ctx=256, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reference() -> Iterator[Llama]:
    """llama-cpp-python computing logprobs its own way: logits kept for every position."""
    model = Llama(model_path=str(smollm2_path()), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    yield model
    model.close()


def generate(llama: Llama, prompt: str, **body: Any) -> tuple[str, list[TokenLogprob], sampling.ChoiceEnd]:
    tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    sampling.forget(llama)
    llama.eval(tokens[:-1])
    pieces: list[str] = []
    entries: list[TokenLogprob] = []

    def emit(text: str, logprobs: tuple[TokenLogprob, ...], choice: int) -> None:
        pieces.append(text)
        entries.extend(logprobs)

    end = run_choice(llama, tokens, parsed(**body), 0, emit, lambda: False)
    return "".join(pieces), entries, end


def test_generated_logprobs_match_llama_cpp_python_s(llama: Llama, reference: Llama) -> None:
    text, entries, end = generate(llama, PROMPT, temperature=0, max_tokens=6, logprobs=3)
    whole = reference.create_completion(PROMPT, temperature=0, max_tokens=6, logprobs=3)
    assert isinstance(whole, dict)
    expected = whole["choices"][0]
    assert text == expected["text"] and end == sampling.ChoiceEnd(0, "length", 6)
    logprobs = expected["logprobs"]
    assert [entry.token.decode() for entry in entries] == logprobs["tokens"]
    assert [entry.logprob for entry in entries] == pytest.approx(logprobs["token_logprobs"], abs=1e-3)
    for entry, top in zip(entries, logprobs["top_logprobs"], strict=True):
        assert len(entry.top) == 3
        assert {t.token.decode(): t.logprob for t in entry.top} == pytest.approx(
            dict(sorted(top.items(), key=lambda item: -item[1])[:3]), abs=1e-3
        )


def test_prompt_scores_match_llama_cpp_python_s_logits(llama: Llama, reference: Llama) -> None:
    # Its own echo pairs each token with the logits its position predicts the next one from, so the reference is
    # its logits for every position, normalised here.
    prompt = PROMPT + " Paris, and the capital of Italy is Rome."
    tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    pieces = prompt_pieces(llama, tokens, prompt)
    assert b"".join(pieces).decode() == prompt
    scored = score_prompt(llama, tokens, pieces, 2, lambda: False)
    assert scored is not None and scored[0] == TokenLogprob(pieces[0], None)
    assert llama.n_tokens == len(tokens) - 1  # all but the last, for a generation to follow
    sampling.forget(reference)
    reference.eval(tokens)
    scores = reference.scores[: len(tokens)]
    shifted = scores - scores.max(axis=1, keepdims=True)
    normalised = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = [float(normalised[i - 1, tokens[i]]) for i in range(1, len(tokens))]
    assert [entry.logprob for entry in scored[1:]] == pytest.approx(expected, abs=1e-3)
    best = [int(np.argmax(normalised[i - 1])) for i in range(1, len(tokens))]
    assert [entry.top[0].token for entry in scored[1:]] == [token_bytes(llama._model.vocab, t, True) for t in best]


def test_a_seed_gives_the_same_tokens_and_another_seed_others(llama: Llama) -> None:
    body = {"temperature": 1.0, "max_tokens": 24, "logprobs": 0}
    first = generate(llama, "Once upon a time", seed=11, **body)
    assert generate(llama, "Once upon a time", seed=11, **body) == first
    assert generate(llama, "Once upon a time", seed=12, **body)[0] != first[0]


def test_a_stop_string_drops_its_tokens_logprobs_too(llama: Llama) -> None:
    full, _, _ = generate(llama, "1, 2, 3, 4,", temperature=0, max_tokens=8, logprobs=0)
    assert " 6," in full
    text, stopped, end = generate(llama, "1, 2, 3, 4,", temperature=0, max_tokens=8, logprobs=0, stop=[" 6,"])
    assert text == full[: full.index(" 6,")] and end.finish_reason == "stop"
    assert b"".join(entry.token for entry in stopped).decode() == text
    assert end.completion_tokens > len(stopped)  # the stop string's tokens were generated, and count


def test_logit_bias_bans_the_greedy_token(llama: Llama) -> None:
    text, _, _ = generate(llama, PROMPT, temperature=0, max_tokens=1)
    token = llama.tokenize(text.encode(), add_bos=False, special=False)
    assert len(token) == 1
    banned, _, _ = generate(llama, PROMPT, temperature=0, max_tokens=1, logit_bias={str(token[0]): -100})
    assert banned != text


def test_token_bytes_are_exact(llama: Llama) -> None:
    vocab = llama._model.vocab
    im_start = llama.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert token_bytes(vocab, im_start[0], special=True) == b"<|im_start|>"
    assert token_bytes(vocab, im_start[0]) == b""
    assert token_bytes(vocab, llama.tokenize(b" Paris", add_bos=False, special=False)[0]) == b" Paris"
