"""server.targets.node_logprobs: a node's logprobs in OpenAI's shapes; the plane's bounds on them and on choices."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.errors import UpstreamProtocolError
from server.nodes.bounds import LOGPROB_FLOOR, MAX_TOKEN_BYTES, MAX_TOP_LOGPROBS, clamp_job_event
from server.targets.base import Call
from server.targets.node import _Answer
from server.targets.node_logprobs import ChoiceLogprobs, first_offset, requested, token_text


def entry(token: bytes, logprob: float | None, *top: tuple[bytes, float]) -> pb.TokenLogprob:
    return pb.TokenLogprob(token=token, logprob=logprob, top=[pb.TopLogprob(token=t, logprob=p) for t, p in top])


def test_what_the_request_asked_for() -> None:
    assert requested("chat/completions", {"logprobs": True, "top_logprobs": 4}) == 4
    assert requested("chat/completions", {"logprobs": True}) == 0
    assert requested("chat/completions", {"logprobs": False, "top_logprobs": 4}) is None
    assert requested("completions", {"logprobs": 0}) == 0
    assert requested("completions", {"logprobs": None}) is None
    assert requested("completions", {"logprobs": True}) is None


def test_a_token_that_splits_a_character_is_written_as_its_bytes() -> None:
    assert token_text(b" Paris") == " Paris"
    assert token_text("é".encode()[:1]) == "bytes:\\xc3"


def test_chat_entries_carry_token_bytes_and_the_asked_alternatives() -> None:
    logprobs = ChoiceLogprobs(chat=True, top=1)
    fragment = logprobs.add([entry(b" Paris", -0.5, (b" Paris", -0.5), (b" Lyon", -2.0))])
    assert fragment == {
        "content": [
            {
                "token": " Paris",
                "logprob": -0.5,
                "bytes": list(b" Paris"),
                "top_logprobs": [{"token": " Paris", "logprob": -0.5, "bytes": list(b" Paris")}],
            }
        ],
        "refusal": None,
    }
    logprobs.add([entry(b".", -0.25)])
    assert [item["token"] for item in logprobs.whole()["content"]] == [" Paris", "."]


def test_legacy_lists_with_the_sampled_token_and_offsets_in_characters() -> None:
    logprobs = ChoiceLogprobs(chat=False, top=1, offset=3)
    e_acute = "é".encode()
    first = logprobs.add([entry(b"The", None), entry(e_acute[:1], -1.0, (b"x", -0.5)), entry(e_acute[1:], -0.5)])
    assert first == {
        "tokens": ["The", "bytes:\\xc3", "bytes:\\xa9"],
        "token_logprobs": [None, -1.0, -0.5],
        "top_logprobs": [None, {"x": -0.5, "bytes:\\xc3": -1.0}, {"bytes:\\xa9": -0.5}],
        "text_offset": [3, 6, 6],  # the split character counts once, where its first byte is
    }
    logprobs.add([entry(b"!", -0.125)])
    assert logprobs.whole()["text_offset"] == [3, 6, 6, 7]


def test_legacy_offsets_start_past_the_prompt_unless_echoed() -> None:
    assert first_offset({"prompt": "Hello"}) == 5
    assert first_offset({"prompt": ["Hello"]}) == 5
    assert first_offset({"prompt": "Hello", "echo": True}) == 0
    assert first_offset({"prompt": [1, 2, 3]}) == 0


def test_the_plane_clamps_a_node_s_logprobs() -> None:
    tops = [(b"t", -1.0)] * (MAX_TOP_LOGPROBS + 5)
    event = pb.JobEvent(
        job_id="j",
        tokens=pb.TokenBatch(
            text="x",
            logprobs=[entry(b"x" * (MAX_TOKEN_BYTES + 9), 3.0, *tops), entry(b"y", math.nan), entry(b"z", None)],
        ),
    )
    clamp_job_event(event)
    first, second, third = event.tokens.logprobs
    assert len(first.token) == MAX_TOKEN_BYTES and first.logprob == 0.0 and len(first.top) == MAX_TOP_LOGPROBS
    assert second.logprob == LOGPROB_FLOOR
    assert not third.HasField("logprob")
    end = pb.JobEvent(
        job_id="j", end=pb.JobEnd(choices=[pb.ChoiceEnd(index=i, finish_reason="s" * 99) for i in range(200)])
    )
    clamp_job_event(end)
    assert len(end.end.choices) == 128 and len(end.end.choices[0].finish_reason) == 32


def test_a_batch_for_a_choice_the_request_did_not_ask_for_fails_the_attempt() -> None:
    answer = _Answer(Call("chat/completions", {"n": 2, "logprobs": True}, "req"))
    job: Any = SimpleNamespace(session=SimpleNamespace(name="n1"))
    assert answer.choice(job, pb.TokenBatch(choice=1)) == 1
    with pytest.raises(UpstreamProtocolError, match="choice 2 of a request for 2"):
        answer.choice(job, pb.TokenBatch(choice=2))
    end = pb.JobEnd(finish_reason="stop", choices=[pb.ChoiceEnd(index=1, finish_reason="length")])
    assert answer.finish_reasons(end) == ["stop", "length"]
