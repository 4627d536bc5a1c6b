"""A node pool that cannot take a job now is not waited on while another target can: a drained, paused or full
pool fails over at once, and a busy pool waits for a slot (briefly) only when nothing after it can serve.

The node is an agent speaking the real gRPC protocol (tests/support/hostile_agent.py, behaving), the fallback a mock
provider; the plane's queue timeout is long here (30 s, the old default) and the request's deadline shorter
(20 s): a request that waited on the pool would run out of time before anything else could serve it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from proto.hatchway.node.v1 import node_pb2 as pb
from server.config import Config
from server.nodes.registry import NodeRegistry
from tests.conftest import Gateway, eventually
from tests.support.hostile_agent import HostileAgent, Session, hello, model
from tests.support.loop_thread import LoopThread
from tests.support.mock_upstream import Fault, MockUpstream

FAKE = "fake"
BODY = {"model": FAKE, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(node_queue_timeout_s=30.0, upstream_header_timeout_s=30.0, request_deadline_s=20.0)


@dataclass
class Pool:
    gateway: Gateway
    cloud: MockUpstream
    session: Session
    loop: LoopThread

    @property
    def registry(self) -> NodeRegistry:
        return self.gateway.plane.server.plane.registry

    def route(self, *targets: str) -> None:
        self.gateway.plane.admin.put("/routes", {"org": "acme", "model": FAKE, "targets": list(targets)})

    def ask(self) -> httpx.Response:
        return httpx.post(
            f"{self.gateway.plane.v1}/chat/completions", json=BODY, headers=self.gateway.auth(), timeout=60
        )

    def say(self, message: pb.AgentMessage) -> None:
        self.loop.run(self.session.send(message))

    def hold_the_only_slot(self) -> threading.Thread:
        """A request the node takes and does not answer (until `serve`): its one slot stays busy."""
        holder = threading.Thread(target=self.ask)
        holder.start()
        eventually(lambda: self.registry.busy_slots() == 1)
        return holder

    def serve(self, text: str = "from the node", jobs: int = 1) -> None:
        self.loop.run(self.session.serve(text, jobs))


@pytest.fixture
def pool(gateway: Gateway, make_upstream: Callable[..., MockUpstream]) -> Iterator[Pool]:
    """Org `acme` with one node serving FAKE with one slot, and provider `cloud` serving FAKE too."""
    plane = gateway.plane
    cloud = make_upstream("cloud", reply="from the cloud", models=[FAKE])
    plane.add_provider("cloud", cloud, models=[FAKE])
    token = plane.admin.post("/node-tokens", {"org": "acme", "uses": 5})["token"]
    loop = LoopThread(timeout_s=60)
    agent = HostileAgent(f"127.0.0.1:{plane.server.plane.grpc_port}", token)
    loop.run(agent.enroll())
    session = loop.run(agent.connect(hello([model(FAKE, slots=1)])))
    loop.run(session.start_reading())
    yield Pool(gateway, cloud, session, loop)
    loop.run(session.close())
    loop.close()


def served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_a_drained_pool_fails_over_at_once(pool: Pool) -> None:
    pool.route("nodes", "cloud")
    (node_id,) = pool.registry.sessions
    pool.gateway.plane.admin.post(f"/nodes/{node_id}/drain", {})
    assert served_by(pool.ask()) == "from the cloud"


def test_a_pool_paused_by_its_owner_fails_over_at_once(pool: Pool) -> None:
    pool.route("nodes", "cloud")
    pool.say(pb.AgentMessage(status=pb.Status(version=1, idle_paused=True)))
    eventually(lambda: all(s.state == "idle-paused" for s in pool.registry.sessions.values()))
    assert served_by(pool.ask()) == "from the cloud"


def test_a_drained_pool_that_is_the_last_target_is_a_503_at_once(pool: Pool) -> None:
    pool.gateway.plane.admin.delete("/providers/cloud")
    (node_id,) = pool.registry.sessions
    pool.gateway.plane.admin.post(f"/nodes/{node_id}/drain", {})
    response = pool.ask()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "nodes_unavailable"


def test_a_full_pool_is_not_waited_on_while_another_target_can_serve(pool: Pool) -> None:
    pool.route("nodes", "cloud")
    holder = pool.hold_the_only_slot()
    assert served_by(pool.ask()) == "from the cloud"
    pool.serve()
    holder.join(10)


def test_a_full_pool_is_waited_on_when_no_other_target_can_serve(pool: Pool) -> None:
    pool.route("cloud", "nodes")
    pool.cloud.always = Fault("status", status=503)  # the provider fails: the node is what is left
    holder = pool.hold_the_only_slot()
    result: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: result.update(answer=pool.ask()))
    waiting.start()
    eventually(lambda: len(pool.cloud.requests) >= 4)  # the holder's two tries, then this one's: the pool is last
    pool.serve(jobs=2)  # the held job ends, which frees the slot for the waiting request, then that one
    holder.join(10)
    waiting.join(10)
    response = result["answer"]
    assert served_by(response) == "from the node"
    assert response.headers["x-hatchway-route"] in pool.registry.sessions
