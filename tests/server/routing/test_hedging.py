"""A slow first token is hedged: the next target starts alongside, the first content token wins, the other is
cancelled and recorded as a failed attempt. Seen from outside: a real plane, real sockets, the fault-injecting
upstream, a node over the real gRPC link. Without hedging every stream below would wait 20 s for its primary, past
the request's deadline (15 s here): one answered by another target was hedged before it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from server.cli import cli
from server.config import Config
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane, eventually
from tests.server.routing.test_failover import REPLY, read_stream
from tests.server.routing.test_failover import Pair as FailoverPair
from tests.server.routing.test_stalls import node_then_cloud
from tests.support.loop_thread import LoopThread
from tests.support.mock_upstream import Fault, MockUpstream

SLOW_S = 20.0


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(
        ttft_timeout_s=60.0,
        stream_idle_timeout_s=60.0,
        request_deadline_s=15.0,
        hedge="auto",
        hedge_floor_s=0.2,
        hedge_unmeasured_s=0.5,
    )


class Pair(FailoverPair):
    def ask(self, *, stream: bool = True) -> httpx.Response:
        return self.chat(stream=stream, timeout=120)

    def route(self, **fields: Any) -> dict[str, Any]:
        body = {"org": "acme", "model": MODEL, "targets": ["primary", "backup"], **fields}
        return self.plane.admin.put("/routes", body)  # type: ignore[no-any-return]


@pytest.fixture
def pair(plane: RunningPlane, make_upstream: Callable[..., MockUpstream]) -> Pair:
    plane.create_org()
    primary, backup = make_upstream("primary", reply="PRIMARY " + REPLY), make_upstream("backup", reply=REPLY)
    plane.add_provider("primary", primary, price_in=1.0, price_out=1.0)
    plane.add_provider("backup", backup, price_in=2.0, price_out=2.0)
    pair = Pair(plane, primary, backup, plane.create_key())
    pair.route()
    return pair


def test_a_slow_first_token_is_answered_by_the_next_target_started_alongside(pair: Pair) -> None:
    pair.primary.always = Fault("slow_first_token", delay_s=SLOW_S)
    response = pair.ask()
    stream = read_stream(response)
    assert stream.text == REPLY and stream.done
    assert response.headers["x-hatchway-route"] == "backup"
    eventually(lambda: pair.primary.disconnects == 1, what="the losing request to be closed upstream")


def test_the_loser_of_a_hedge_is_recorded_as_a_failed_attempt_and_not_billed(pair: Pair) -> None:
    pair.primary.always = Fault("slow_first_token", delay_s=SLOW_S)
    read_stream(pair.ask())
    rows = pair.usage_rows(2)
    lost = [r for r in rows if r["target"] == "primary"]
    served = [r for r in rows if r["final"]]
    assert len(lost) == 1 and not lost[0]["final"] and lost[0]["error_code"] == "hedge_lost"
    assert lost[0]["completion_tokens"] == 0 and lost[0]["cost_usd"] is None
    assert len(served) == 1 and served[0]["target"] == "backup" and served[0]["status"] == 200


def test_the_first_target_still_wins_when_its_first_token_comes_first(pair: Pair) -> None:
    pair.primary.always = Fault("slow_first_token", delay_s=1.5)
    pair.backup.always = Fault("slow_first_token", delay_s=SLOW_S)
    response = pair.ask()
    stream = read_stream(response)
    assert stream.text == "PRIMARY " + REPLY and stream.done
    assert response.headers["x-hatchway-route"] == "primary"
    assert len(pair.backup.requests) == 1, "the backup was started alongside"
    eventually(lambda: pair.backup.disconnects == 1, what="the losing request to be closed upstream")


def test_a_route_with_hedging_off_waits_for_its_first_target(pair: Pair) -> None:
    pair.route(hedge="off")
    pair.primary.always = Fault("slow_first_token", delay_s=2.0)
    response = pair.ask()
    assert read_stream(response).text == "PRIMARY " + REPLY
    assert pair.backup.requests == []


def test_a_route_hedges_after_the_seconds_it_names(plane_config: Config, pair: Pair) -> None:
    pair.plane.restart(plane_config.replace(hedge="off"))
    pair.route(hedge="0.5")
    pair.primary.always = Fault("slow_first_token", delay_s=SLOW_S)
    assert read_stream(pair.ask()).text == REPLY


def test_auto_hedging_waits_for_the_targets_own_ttft_p95(plane_config: Config, pair: Pair) -> None:
    # Until the primary has a record, auto would wait longer than its slow first token takes.
    pair.plane.restart(plane_config.replace(hedge_unmeasured_s=50.0, hedge_floor_s=0.2))
    for _ in range(5):
        assert read_stream(pair.ask()).text == "PRIMARY " + REPLY  # fast: its p95 is a few milliseconds
    pair.primary.always = Fault("slow_first_token", delay_s=SLOW_S)
    assert read_stream(pair.ask()).text == REPLY


def test_whole_answers_are_not_hedged(pair: Pair) -> None:
    pair.primary.always = Fault("slow_first_token", delay_s=2.0)
    response = pair.ask(stream=False)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "PRIMARY " + REPLY
    assert pair.backup.requests == []


def test_a_routes_hedge_is_validated_and_shown(pair: Pair) -> None:
    bad = httpx.put(
        f"{pair.plane.url}/admin/v1/routes",
        json={"org": "acme", "model": MODEL, "hedge": "sometimes"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "hedge"
    assert pair.route(hedge=2.5)["hedge"] == "2.5"
    flags = ["admin", "--url", pair.plane.url, "--admin-key", ADMIN_KEY]
    result = CliRunner().invoke(cli, [*flags, "route", "set", MODEL, "--org", "acme", "--hedge", "AUTO"])
    assert result.exit_code == 0, result.output
    listed = CliRunner().invoke(cli, [*flags, "route", "list"])
    assert "HEDGE" in listed.output and "auto" in listed.output


def test_an_invalid_hedge_setting_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="hedge"):
        Config(hedge="later")


# -- a node that loses the hedge ------------------------------------------------------------------------


def test_a_node_that_loses_the_hedge_has_its_job_cancelled(
    plane: RunningPlane, make_upstream: Callable[..., MockUpstream], agent_loop: LoopThread
) -> None:
    session, _, key = node_then_cloud(plane, make_upstream, agent_loop)  # the node never answers

    response = httpx.post(
        f"{plane.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert read_stream(response).text == REPLY
    assert response.headers["x-hatchway-route"] == "cloud"

    async def job_and_cancel() -> tuple[str, str]:
        job = await asyncio.wait_for(session.jobs.get(), 10)
        return job.job_id, await asyncio.wait_for(session.cancels.get(), 10)

    job_id, cancelled = agent_loop.run(job_and_cancel())
    assert cancelled == job_id
    agent_loop.run(session.close())
