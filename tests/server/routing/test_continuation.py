"""A rescued stream is one whole answer or an honest error, never two answers stitched together.

The primary (`alpha`) cuts its stream after "Hello", " from"; the fallback (`beta`) answers "Hello from beta" in
whatever way its server treats a continuation request: it ignores a prefill and answers anew (OpenAI's API), it
continues the prefill (llama.cpp's server), it refuses it with a 400, or it continues only with vLLM's flags. Each
provider's `continuation` setting says which form the plane uses (server.routing.continuation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.command import upgrade as alembic_upgrade
from sqlalchemy import text

from server.cli.client import AdminAPIError
from server.config import Config
from server.policy.declarative import apply_declared
from server.routing.continuation import Continuation, ContinuationMismatch
from server.storage.audit import AuditLog
from server.storage.db import make_engine
from tests.conftest import MODEL, RunningPlane
from tests.server.storage.test_storage import alembic_config
from tests.support.mock_upstream import Fault, MockUpstream

DELIVERED = "Hello from"


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(
        upstream_header_timeout_s=2.0, ttft_timeout_s=2.0, stream_idle_timeout_s=2.0, request_deadline_s=20.0
    )


@dataclass
class Rescue:
    """`alpha` then `beta` serving MODEL; alpha cuts its first stream after "Hello", " from" and then fails."""

    plane: RunningPlane
    alpha: MockUpstream
    beta: MockUpstream
    key: str

    def stream(self, **fields: Any) -> Stream:
        self.alpha.faults.append(Fault("cut", after_chunks=2))
        # Only beta may rescue: alpha failing for good keeps the test about beta's answer.
        self.alpha.always = Fault("status", status=503)
        return read_stream(self.post(stream=True, **fields))

    def post(self, **fields: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "greet me"}], **fields}
        return httpx.post(
            f"{self.plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )

    @property
    def rescue_request(self) -> dict[str, Any]:
        body = self.beta.requests[-1].json
        assert isinstance(body, dict)
        return body


@pytest.fixture
def make_rescue(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> Callable[..., Rescue]:
    def make(
        *, beta_reply: str = "Hello from beta", continuation: str | None = None, alpha: str | None = None, **knobs: Any
    ) -> Rescue:
        """`continuation` declares beta's form and `alpha` alpha's (left out: the default); `knobs` set how beta's
        server behaves."""

        def declared(form: str | None) -> dict[str, str]:
            return {"continuation": form} if form else {}

        plane.create_org()
        first = make_upstream("alpha", reply="Hello from alpha")
        beta = make_upstream("beta", reply=beta_reply, **knobs)
        plane.add_provider("alpha", first, **declared(alpha))
        plane.add_provider("beta", beta, **declared(continuation))
        return Rescue(plane, first, beta, plane.create_key())

    return make


@dataclass
class Stream:
    text: str
    done: bool
    error: dict[str, Any] | None


def read_stream(response: httpx.Response) -> Stream:
    assert response.status_code == 200, response.text
    payloads = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
    docs = [json.loads(p) for p in payloads if p != "[DONE]"]
    error = docs[-1]["error"] if docs and "error" in docs[-1] else None
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d.get("choices"))
    return Stream(text, payloads[-1] == "[DONE]", error)


def is_prefill(body: dict[str, Any]) -> bool:
    return bool(body["messages"][-1] == {"role": "assistant", "content": DELIVERED})


# -- from outside: real plane, real sockets, the mock upstream --------------------------------------------


def test_a_plain_provider_regenerates_and_only_the_rest_of_the_new_answer_is_relayed(make_rescue) -> None:
    # The reproduction of issue 16: the default used to send a prefill that beta answered anew, and the client
    # got "Hello fromHello from beta" and [DONE].
    rescue = make_rescue(ignores_prefill=True)
    stream = rescue.stream()
    assert (stream.text, stream.done, stream.error) == ("Hello from beta", True, None)
    assert not is_prefill(rescue.rescue_request), "a plain provider is asked for a new answer"


def test_a_new_answer_that_differs_ends_in_an_error_event_and_no_done(make_rescue) -> None:
    rescue = make_rescue(beta_reply="Greetings from beta", ignores_prefill=True)
    stream = rescue.stream()
    assert stream.text == DELIVERED, "nothing of the different answer reaches the client"
    assert not stream.done
    assert stream.error is not None and "could not be continued" in stream.error["message"]


def test_a_declared_prefill_provider_continues_the_answer(make_rescue) -> None:
    rescue = make_rescue(continuation="prefill")
    stream = rescue.stream()
    assert (stream.text, stream.done, stream.error) == ("Hello from beta", True, None)
    assert is_prefill(rescue.rescue_request) and len(rescue.beta.requests) == 1


def test_a_declared_prefill_provider_that_answers_anew_is_trimmed_as_a_regeneration(make_rescue) -> None:
    rescue = make_rescue(continuation="prefill", ignores_prefill=True)
    stream = rescue.stream()
    assert (stream.text, stream.done, stream.error) == ("Hello from beta", True, None)
    assert is_prefill(rescue.rescue_request)


def test_a_prefill_refused_with_a_400_falls_back_to_regeneration_every_time(make_rescue) -> None:
    rescue = make_rescue(continuation="prefill", accepts_prefill=False)
    for rescues in (1, 2):
        stream = rescue.stream()
        assert (stream.text, stream.done, stream.error) == ("Hello from beta", True, None)
        # The refused prefill, then a new answer: nothing is learnt, the declaration stands.
        assert len(rescue.beta.requests) == 2 * rescues
        assert is_prefill(rescue.beta.requests[-2].json) and not is_prefill(rescue.rescue_request)


def test_the_vllm_form_sends_continue_final_message_without_the_generation_prompt(make_rescue) -> None:
    rescue = make_rescue(continuation="vllm", vllm_prefill=True)
    stream = rescue.stream()
    assert (stream.text, stream.done, stream.error) == ("Hello from beta", True, None)
    sent = rescue.rescue_request
    assert is_prefill(sent)
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert len(rescue.beta.requests) == 1


def test_a_vllm_server_declared_prefill_answers_anew_and_is_trimmed_not_stitched(make_rescue) -> None:
    rescue = make_rescue(continuation="prefill", vllm_prefill=True)
    stream = rescue.stream()
    assert (stream.text, stream.done) == ("Hello from beta", True)
    assert "continue_final_message" not in rescue.rescue_request


def test_a_provider_declared_none_is_never_asked_to_rescue(make_rescue) -> None:
    rescue = make_rescue(continuation="none")
    stream = rescue.stream()
    assert stream.text == DELIVERED and not stream.done and stream.error is not None
    assert rescue.beta.requests == []


def test_a_stream_that_no_target_may_continue_ends_at_once_with_an_error_event(make_rescue) -> None:
    rescue = make_rescue(continuation="none", alpha="none")
    stream = rescue.stream()
    assert stream.text == DELIVERED and not stream.done
    assert stream.error is not None and "may continue" in stream.error["message"]
    assert len(rescue.alpha.requests) == 1 and rescue.beta.requests == []


def test_whole_answers_are_sent_as_asked_whatever_the_continuation(make_rescue) -> None:
    rescue = make_rescue(continuation="vllm", vllm_prefill=True)
    rescue.alpha.always = Fault("status", status=503)
    response = rescue.post()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello from beta"
    sent = rescue.rescue_request
    assert sent["messages"] == [{"role": "user", "content": "greet me"}] and "continue_final_message" not in sent


# -- the setting ---------------------------------------------------------------------------------------


def test_continuation_is_set_on_add_and_changed_by_update(plane: RunningPlane, upstream: MockUpstream) -> None:
    plane.create_org()
    assert plane.add_provider("p", upstream)["continuation"] == "regenerate"
    assert plane.admin.patch("/providers/p", {"continuation": "vllm"})["continuation"] == "vllm"
    assert plane.add_provider("q", upstream, continuation="none")["continuation"] == "none"


@pytest.mark.parametrize("setting", ["continuation", "prefill"], ids=["unknown", "old-prefill"])
def test_an_unknown_continuation_or_the_old_prefill_setting_is_refused(
    plane: RunningPlane, upstream: MockUpstream, setting: str
) -> None:
    plane.create_org()
    plane.add_provider("p", upstream)
    with pytest.raises(AdminAPIError) as refused:
        plane.admin.patch("/providers/p", {setting: "auto"})
    assert refused.value.status == 400 and setting in str(refused.value)


def test_the_config_file_declares_continuation_and_leaves_it_alone_when_silent(
    plane: RunningPlane, upstream: MockUpstream
) -> None:
    store = plane.server.plane.store
    audit = AuditLog(store.engine)
    declared = {"org": "acme", "name": "p", "base_url": upstream.url, "models": [MODEL]}
    apply_declared(store, {"providers": [declared | {"continuation": "prefill"}]}, None, audit)
    assert store.list_providers("acme")[0]["continuation"] == "prefill"
    store.update_provider("p", "acme", continuation="vllm")
    apply_declared(store, {"providers": [declared]}, None, audit)
    assert store.list_providers("acme")[0]["continuation"] == "vllm"


def test_the_old_prefill_setting_is_migrated_to_a_continuation(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        alembic_upgrade(cfg, "0006")
        connection.execute(text("INSERT INTO org (id, name, created_at) VALUES ('o', 'acme', '2026-01-01')"))
        for name, prefill in (("a", "auto"), ("y", "yes"), ("n", "no")):
            connection.execute(
                text(
                    "INSERT INTO provider (id, org_id, name, base_url, position, policy, prefill, created_at) "
                    "VALUES (:name, 'o', :name, 'http://x', 0, '', :prefill, '2026-01-01')"
                ),
                {"name": name, "prefill": prefill},
            )
        alembic_upgrade(cfg, "0007")
        rows = {name: form for name, form in connection.execute(text("SELECT name, continuation FROM provider"))}
    # "auto" learnt prefill from a 200; "no" meant regenerate: both become the checked regeneration.
    assert rows == {"a": "regenerate", "y": "prefill", "n": "regenerate"}


# -- the check itself ------------------------------------------------------------------------------------


def test_regeneration_is_an_exact_match_whitespace_included() -> None:
    with pytest.raises(ContinuationMismatch):
        Continuation("Hello  from", "regenerate").feed("Hello from beta")


def test_a_regeneration_shorter_than_the_delivered_text_is_refused_at_its_end() -> None:
    continuation = Continuation("Hello from", "regenerate")
    assert continuation.feed("Hello") == ""
    with pytest.raises(ContinuationMismatch):
        continuation.finish()


def test_a_prefill_continuation_is_passed_on_once_it_differs_from_the_delivered_text() -> None:
    continuation = Continuation("Hello from", "verify")
    assert continuation.feed(" be") == " be"
    assert continuation.feed("ta") == "ta"


def test_a_prefill_answer_that_restarts_the_delivered_text_is_trimmed() -> None:
    continuation = Continuation("Hello from", "verify")
    assert continuation.feed("Hello") == ""
    assert continuation.feed(" from beta") == " beta"


def test_a_short_prefill_continuation_held_back_is_released_at_its_end() -> None:
    continuation = Continuation("Hello from", "verify")
    assert continuation.feed("Hello") == ""
    assert continuation.finish() == "Hello"


def test_a_node_continuation_is_trusted_as_it_comes() -> None:
    assert Continuation("ha", "trust").feed("ha ha") == "ha ha"
