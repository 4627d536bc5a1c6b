"""Several providers behind one model name: each serves when it is the one configured; added order decides."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.conftest import MODEL, RunningPlane
from tests.support.mock_upstream import MockUpstream

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def ask(plane: RunningPlane, key: str) -> httpx.Response:
    return httpx.post(f"{plane.v1}/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})


def test_provider_a_alone_answers(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> None:
    plane.create_org()
    plane.add_provider("provider-a", make_upstream("a", reply="from A"))
    response = ask(plane, plane.create_key())
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "from A"
    assert response.headers["x-hatchway-route"] == "provider-a"


def test_provider_b_alone_answers(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> None:
    plane.create_org()
    plane.add_provider("provider-b", make_upstream("b", reply="from B"))
    response = ask(plane, plane.create_key())
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "from B"


def test_without_a_rule_the_first_added_provider_serves(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    a, b = make_upstream("a", reply="from A"), make_upstream("b", reply="from B")
    plane.add_provider("provider-a", a)
    plane.add_provider("provider-b", b)
    key = plane.create_key()
    assert all(ask(plane, key).headers["x-hatchway-route"] == "provider-a" for _ in range(3))
    assert len(b.requests) == 0


def test_removing_the_first_provider_hands_the_model_to_the_next(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    plane.add_provider("provider-a", make_upstream("a"))
    plane.add_provider("provider-b", make_upstream("b", reply="from B"))
    key = plane.create_key()
    plane.admin.delete("/providers/provider-a")
    assert ask(plane, key).headers["x-hatchway-route"] == "provider-b"


def test_a_failing_first_provider_falls_through_to_the_next_in_order(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream]
) -> None:
    plane.create_org()
    plane.add_provider("provider-a", make_upstream("a", fail_status=503))
    plane.add_provider("provider-b", make_upstream("b", reply="from B"))
    response = ask(plane, plane.create_key())
    assert response.status_code == 200
    assert response.headers["x-hatchway-route"] == "provider-b"
    # 503 earns one retry of the same target (max_retries=1) before the next target serves.
    assert response.headers["x-hatchway-attempts"] == "3"


def test_provider_keys_are_used_in_turn(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> None:
    plane.create_org()
    upstream = make_upstream("a")
    plane.add_provider("provider-a", upstream, api_keys=["sk-one", "sk-two"])
    key = plane.create_key()
    for _ in range(4):
        ask(plane, key)
    assert [r.headers["Authorization"] for r in upstream.requests] == ["Bearer sk-one", "Bearer sk-two"] * 2
