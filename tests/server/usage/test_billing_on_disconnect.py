"""Every token that left is billed: a client that hangs up mid-answer (or just before `[DONE]`) pays for what was
generated for it, by the upstream's or node's own count when it arrives, else by the plane's estimate of the
delivered text (server.usage.metering.delivered_tokens), and its limits, quotas and the node's earnings settle on it.

Real plane, real sockets: the fault-injecting upstream (tests/support/mock_upstream.py), a scripted node that streams
until it is cancelled and then reports its count (below), and the real agent with SmolLM2."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.config import Config
from server.policy.limits import estimate_tokens
from server.usage.metering import BYTES_PER_TOKEN
from tests.conftest import MODEL, Gateway, RunningPlane, abandon_request, usage_report
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe
from tests.support.hostile_node_usage import LyingNode
from tests.support.mock_upstream import split_reply
from tests.support.served_nodes import COUNTING, for_agents

REPLY = " ".join(f"word{i}" for i in range(40))
MESSAGES = [{"role": "user", "content": "Count for me"}]


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return for_agents(plane_config).replace(node_cancel_timeout_s=1.0)


def rows(plane: RunningPlane) -> list[dict[str, Any]]:
    return plane.sql("SELECT * FROM usage_record WHERE final ORDER BY id")


def final_rows(plane: RunningPlane, count: int, timeout_s: float = 15) -> list[dict[str, Any]]:
    """The final usage rows once `count` of them were written."""
    deadline = time.monotonic() + timeout_s
    while len(found := rows(plane)) < count:
        assert time.monotonic() < deadline, f"{len(found)} final rows, expected {count}"
        time.sleep(0.05)
    return found


def estimate(text: str, chunks: int) -> int:
    """The plane's estimate for delivered text that no usage came for (server.usage.metering.delivered_tokens)."""
    return max(chunks, math.ceil(len(text.encode()) / BYTES_PER_TOKEN))


def prompt_estimate(body: dict[str, Any]) -> int:
    return estimate_tokens("chat/completions", body, 0)[0]


def read_then_leave(plane: RunningPlane, key: str, body: dict[str, Any], leave: Any) -> list[dict[str, Any]]:
    """Stream a chat completion, and close the connection once `leave(chunks so far)` says so; the chunks read."""
    chunks: list[dict[str, Any]] = []
    with httpx.stream(
        "POST", f"{plane.v1}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the client was meant to leave before [DONE]"
                chunks.append(orjson.loads(line[6:]))
                if leave(chunks):
                    break
    return chunks


def content_of(chunks: list[dict[str, Any]]) -> list[str]:
    return [
        c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]


def quota_used(plane: RunningPlane) -> int:
    return int(plane.admin.get("/limits", org="acme")["data"][0]["usage"]["tokens_per_day_used"])


def settled(plane: RunningPlane, expected: int, timeout_s: float = 15) -> int:
    deadline = time.monotonic() + timeout_s
    while (used := quota_used(plane)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return used


# -- providers -------------------------------------------------------------------------------------------------


def test_a_client_that_reads_part_of_a_stream_and_leaves_is_billed_the_delivered_estimate(gateway: Gateway) -> None:
    plane = gateway.plane
    plane.admin.put("/limits", {"org": "acme", "tokens_per_day": 1_000_000})
    gateway.upstream.reply = REPLY
    gateway.upstream.chunk_delay_s = 0.1
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    chunks = read_then_leave(plane, gateway.api_key, body, lambda cs: len(content_of(cs)) == 6)
    read = content_of(chunks)
    [row] = final_rows(plane, 1)
    assert row["status"] == 499
    # The plane may have sent a chunk or two more than the client read before it saw the client go.
    assert estimate("".join(read), 6) <= row["completion_tokens"] <= estimate(REPLY, len(split_reply(REPLY)))
    assert row["prompt_tokens"] == prompt_estimate(body)
    assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 2.0) / 1e6)
    billed = row["prompt_tokens"] + row["completion_tokens"]
    assert settled(plane, billed) == billed  # the quota is charged the same figure
    [report] = usage_report(plane, 1, by="model")
    assert (report["prompt_tokens"], report["completion_tokens"]) == (row["prompt_tokens"], row["completion_tokens"])
    assert report["cost_usd"] == pytest.approx(row["cost_usd"])


def test_a_client_that_reads_every_word_and_leaves_before_the_usage_is_billed_the_estimate(gateway: Gateway) -> None:
    plane = gateway.plane
    gateway.upstream.reply = REPLY
    # The upstream's usage chunk comes this long after the finish chunk: the client is gone by then.
    gateway.upstream.chunk_delay_s = 0.3
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    chunks = read_then_leave(plane, gateway.api_key, body, lambda cs: bool(cs[-1]["choices"][0]["finish_reason"]))
    assert "".join(content_of(chunks)) == REPLY
    [row] = final_rows(plane, 1)
    assert row["status"] == 499
    assert row["completion_tokens"] == estimate(REPLY, len(split_reply(REPLY)))
    assert row["prompt_tokens"] == prompt_estimate(body)
    assert row["cost_usd"] > 0


def test_a_client_that_reads_the_usage_and_leaves_before_done_is_billed_the_upstreams_usage(gateway: Gateway) -> None:
    plane = gateway.plane
    gateway.upstream.reply = REPLY
    gateway.upstream.done_delay_s = 2.0
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    chunks = read_then_leave(plane, gateway.api_key, body, lambda cs: bool(cs[-1].get("usage")))
    usage = chunks[-1]["usage"]
    [row] = final_rows(plane, 1)
    assert row["status"] == 499
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["completion_tokens"] == 40  # the mock counts words
    assert row["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 1.0 + 40 * 2.0) / 1e6)


def test_leaving_before_done_cannot_pass_a_daily_token_quota(gateway: Gateway) -> None:
    plane = gateway.plane
    plane.admin.put("/limits", {"org": "acme", "tokens_per_day": 100})
    gateway.upstream.chunk_delay_s = 0.2
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 5}
    statuses = []
    for _ in range(40):
        with httpx.stream(
            "POST", f"{plane.v1}/chat/completions", json=body, headers=gateway.auth(), timeout=30
        ) as response:
            statuses.append(response.status_code)
            for line in response.iter_lines():
                if '"finish_reason":"stop"' in line:
                    break  # the whole answer, and gone before [DONE]
    served = statuses.count(200)
    assert statuses.count(429) == 40 - served and served < 40
    assert statuses[served:] == [429] * (40 - served), "once the quota is used up, every request is refused"
    billed = final_rows(plane, 40)
    charged = sum(r["prompt_tokens"] + r["completion_tokens"] for r in billed if r["status"] == 499)
    assert [r["status"] for r in billed].count(499) == served
    assert 0 < charged <= 100
    assert settled(plane, charged) == charged


# -- nodes -----------------------------------------------------------------------------------------------------


class CountingNode(LyingNode):
    """A node that streams one word a token, every `every_s`, until the plane cancels the job; then it ends the
    job as the agent does: a JobEnd with finish_reason "cancelled" and its own token counts."""

    every_s = 0.05
    # False: it stops at a cancel but never says how much it generated (an old or broken agent).
    confirms = True

    def __init__(self, address: str, **fields: Any) -> None:
        super().__init__(address, name="counter", model="counter-model", **fields)
        self.sent: dict[str, int] = {}
        self._cancelled: set[str] = set()

    async def _read(self) -> None:
        while (message := await self._call.read()) is not grpc.aio.EOF:
            kind = message.WhichOneof("kind")
            if kind == "job":
                task = asyncio.create_task(self._answer(message.job.job_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "cancel":
                self._cancelled.add(message.cancel.job_id)

    async def _answer(self, job_id: str) -> None:
        self.sent[job_id] = 0
        while job_id not in self._cancelled and self.sent[job_id] < 1000:
            batch = pb.TokenBatch(text=f"w{self.sent[job_id] % 10} ", tokens=1)
            await self._write(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, tokens=batch)))
            self.sent[job_id] += 1
            await asyncio.sleep(self.every_s)
        if not self.confirms:
            return
        end = pb.JobEnd(
            finish_reason="cancelled", prompt_tokens=self.prompt_tokens, completion_tokens=self.sent[job_id]
        )
        await self._write(pb.AgentMessage(job=pb.JobEvent(job_id=job_id, end=end)))


@pytest.fixture
def counting_node(plane: RunningPlane) -> Iterator[tuple[CountingNode, str]]:
    plane.create_org("acme")
    key = plane.create_key("acme")
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    node = CountingNode(f"127.0.0.1:{plane.server.plane.grpc_port}", prompt_tokens=9)
    plane.loop_thread.run(node.enroll(token))
    plane.loop_thread.run(node.connect())
    deadline = time.monotonic() + 10
    while not plane.server.plane.registry.sessions:
        assert time.monotonic() < deadline, "the node never connected"
        time.sleep(0.05)
    yield node, key
    plane.loop_thread.run(node.close())


def earnings(plane: RunningPlane) -> list[dict[str, Any]]:
    return plane.admin.get("/earnings", by="node")["data"]  # type: ignore[no-any-return]


def test_a_node_stream_the_client_left_is_billed_the_nodes_count_and_credited_to_it(
    plane: RunningPlane, counting_node: tuple[CountingNode, str]
) -> None:
    node, key = counting_node
    body = {"model": node.model, "messages": MESSAGES, "stream": True}
    read_then_leave(plane, key, body, lambda cs: len(content_of(cs)) == 6)
    [row] = final_rows(plane, 1)
    [generated] = node.sent.values()
    assert generated >= 6
    assert (row["status"], row["node_id"], row["target"]) == (499, node.node_id, node.node_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (9, generated)
    assert row["cost_usd"] == pytest.approx((9 * 1.0 + generated * 2.0) / 1e6)
    [earned] = earnings(plane)
    assert (earned["node_id"], earned["completion_tokens"]) == (node.node_id, generated)
    assert earned["earned_usd"] == pytest.approx(row["cost_usd"])


def test_a_node_stream_whose_node_never_reports_its_count_is_billed_the_delivered_estimate(
    plane: RunningPlane, counting_node: tuple[CountingNode, str]
) -> None:
    node, key = counting_node
    node.confirms = False
    body = {"model": node.model, "messages": MESSAGES, "stream": True}
    read_then_leave(plane, key, body, lambda cs: len(content_of(cs)) == 6)
    [row] = final_rows(plane, 1)  # after the registry's cancel timeout (1 s here)
    [generated] = node.sent.values()
    assert (row["status"], row["node_id"]) == (499, node.node_id)
    # Each of its tokens is 3 bytes and a chunk of its own: the estimate is the number of chunks delivered.
    assert 6 <= row["completion_tokens"] <= generated
    assert row["prompt_tokens"] == prompt_estimate(body)
    assert row["cost_usd"] > 0


def test_a_whole_node_answer_the_client_left_is_billed_and_names_the_node(
    plane: RunningPlane, counting_node: tuple[CountingNode, str]
) -> None:
    node, key = counting_node
    body = {"model": node.model, "messages": MESSAGES}
    abandon_request(f"{plane.v1}/chat/completions", body, key, after_s=0.5)
    [row] = final_rows(plane, 1)
    [generated] = node.sent.values()
    assert generated > 0
    assert (row["status"], row["node_id"], row["target"]) == (499, node.node_id, node.node_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (9, generated)
    assert row["cost_usd"] > 0


def test_a_real_agents_stream_the_client_left_is_billed_and_credited(plane: RunningPlane, tmp_path: Path) -> None:
    plane.create_org("acme")
    key = plane.create_key("acme")
    agent = AgentProcess(tmp_path, "node-a")
    try:
        token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
        enrolled = agent.enroll(f"127.0.0.1:{plane.server.plane.grpc_port}", token)
        assert enrolled.returncode == 0, describe(enrolled)
        agent.start("--price-in", "1", "--price-out", "2")
        deadline = time.monotonic() + 60
        while not plane.server.plane.registry.sessions:
            assert time.monotonic() < deadline, f"the agent never connected:\n{agent.output}"
            time.sleep(0.05)
        body = {"model": DEMO_MODEL, "prompt": COUNTING, "max_tokens": 1000, "temperature": 0, "stream": True}
        frames = 0
        with httpx.stream(
            "POST", f"{plane.v1}/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as response:
            for line in response.iter_lines():
                frames += line.startswith("data: ")
                if frames == 20:
                    break
        [row] = final_rows(plane, 1)
        assert row["status"] == 499 and row["node_id"]
        assert row["completion_tokens"] >= 20 and row["prompt_tokens"] > 0
        [earned] = earnings(plane)
        assert earned["completion_tokens"] == row["completion_tokens"]
        assert earned["earned_usd"] == pytest.approx(row["cost_usd"]) and row["cost_usd"] > 0
    finally:
        agent.stop()
