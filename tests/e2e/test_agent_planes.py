"""No single point of failure for nodes: an agent knows every plane of its gateway and, when its plane dies, is
served through another within 5 s, while requests in flight on the other planes go on untouched.

The planes are real `hatchway serve` processes sharing a fresh PostgreSQL database (the one this machine runs on
its standard port), the secret key and the node certificate (tests/support/gateway_planes.py); the agent is the real
`hatchway-agent` with the demo model. A request is made at the plane the agent is connected to.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from agent import connection
from agent.config import AgentConfig
from agent.connection import previous_credential
from agent.idle import OwnerLoad
from proto.contract import enrollment_token_planes, join_enrollment_token, split_enrollment_token
from server.cli import cli
from server.config import Config
from server.serving.serve import Server
from tests.conftest import ADMIN_KEY, RunningPlane, eventually
from tests.server.storage.test_postgres import scratch_database
from tests.support.agent_process import DEMO_MODEL, AgentProcess, agent_cli, describe
from tests.support.gateway_planes import GatewayPlane, chat, share_node_certificate
from tests.support.live_agent import LiveAgent, ScriptedLoad
from tests.support.loop_thread import LoopThread
from tests.support.mock_upstream import MockUpstream

# The bound, from the kill to an answer the node gave through the other plane.
FAILOVER_LIMIT_S = 5.0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NODE_BODY = {"model": DEMO_MODEL, "messages": QUESTION, "max_tokens": 1, "temperature": 0}
MODEL = "gpt-4o-mini"
SLOW_REPLY = " ".join(f"word{i}" for i in range(12))


@dataclass
class Gateway:
    a: GatewayPlane
    b: GatewayPlane
    workdir: Path

    def set_up_org(self) -> str:
        self.a.admin.post("/orgs", {"name": "acme"})
        return str(self.a.admin.post("/keys", {"org": "acme"})["key"])

    def token(self, **fields: object) -> str:
        return str(self.a.admin.post("/node-tokens", {"org": "acme", **fields})["token"])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with scratch_database() as database:
        share_node_certificate([tmp_path / "a", tmp_path / "b"])
        planes: list[GatewayPlane] = []
        try:
            # One after the other: the first migrates the empty database.
            for name in ("a", "b"):
                planes.append(GatewayPlane(tmp_path / name, database))
            yield Gateway(planes[0], planes[1], tmp_path)
        finally:
            for plane in planes:
                plane.close()


def answered_by(response: httpx.Response, node_id: str) -> bool:
    return response.status_code == 200 and response.headers.get("x-hatchway-route") == node_id


def test_an_agent_whose_plane_is_killed_is_served_through_another_plane_within_5_s(gateway: Gateway) -> None:
    key = gateway.set_up_org()
    agent = AgentProcess(gateway.workdir, "node-a")
    result = agent.enroll(gateway.a.node_address, gateway.token(planes=[gateway.b.node_address]))
    assert result.returncode == 0, describe(result)
    node_id = json.loads(agent.config.read_text())["node_id"]
    agent.start()
    try:
        connected_to_a = f"connected to the plane at {gateway.a.node_address}"
        eventually(lambda: connected_to_a in agent.output, 60, f"the agent to connect to plane A:\n{agent.output}")
        assert answered_by(chat(gateway.a.url, key, NODE_BODY), node_id)

        gateway.a.kill()
        killed = time.monotonic()
        answer: httpx.Response | None = None
        while time.monotonic() - killed < FAILOVER_LIMIT_S:
            try:
                answer = chat(gateway.b.url, key, NODE_BODY, timeout_s=FAILOVER_LIMIT_S)
            except httpx.HTTPError:
                answer = None
            if answer is not None and answered_by(answer, node_id):
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - killed
        print(f"plane A killed -> the node answered through plane B after {elapsed:.3f}s")
        assert answer is not None and answered_by(answer, node_id), (
            f"not served through plane B {elapsed:.1f}s after the kill: "
            f"{answer.status_code if answer else None} {answer.text if answer else ''}\nagent:\n{agent.output}"
        )
        assert elapsed < FAILOVER_LIMIT_S
        assert f"connected to the plane at {gateway.b.node_address}" in agent.output
    finally:
        agent.stop()


def test_requests_in_flight_on_another_plane_are_unaffected_by_a_planes_death(
    gateway: Gateway, make_upstream: Callable[..., MockUpstream]
) -> None:
    key = gateway.set_up_org()
    upstream = make_upstream("mock-a", reply=SLOW_REPLY, chunk_delay_s=0.15)
    body = {"org": "acme", "name": "mock-a", "base_url": upstream.url, "api_keys": ["sk-a"], "models": [MODEL]}
    gateway.a.admin.post("/providers", body)
    question = {"model": MODEL, "messages": QUESTION}
    eventually(lambda: chat(gateway.b.url, key, question).status_code == 200, 10, "plane B to serve the provider")

    texts: list[list[str]] = [[] for _ in range(4)]
    ended: list[bool] = [False] * len(texts)

    def stream(index: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream(
            "POST", f"{gateway.b.url}/v1/chat/completions", json={**question, "stream": True}, headers=headers
        ) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    ended[index] = True
                elif line.startswith("data: "):
                    for choice in json.loads(line.removeprefix("data: "))["choices"]:
                        texts[index].append(choice["delta"].get("content") or "")

    clients = [threading.Thread(target=stream, args=(i,)) for i in range(len(texts))]
    for client in clients:
        client.start()
    eventually(lambda: all("".join(t) for t in texts), 10, "every stream's first words")
    gateway.a.kill()
    for client in clients:
        client.join(30)
    assert ended == [True] * len(texts)
    assert ["".join(t) for t in texts] == [SLOW_REPLY] * len(texts)
    assert chat(gateway.b.url, key, question).status_code == 200


def test_an_agent_whose_first_plane_is_down_connects_to_the_next(plane: RunningPlane) -> None:
    plane.create_org("acme")
    agent = LiveAgent.enrolled(plane, load=ScriptedLoad([(0.0, OwnerLoad(0.0))]))
    address = agent.config.plane
    agent.config = agent.config.replace(planes=("127.0.0.1:1", address))
    try:
        agent.start()  # returns once the plane registered the session; the agent reads its Welcome just after
        eventually(lambda: agent.agent is not None and agent.agent.plane == address, 10, "the agent's Welcome")
    finally:
        agent.stop()


def test_an_agent_whose_first_plane_swallows_its_connection_moves_on_after_the_welcome_timeout(
    plane: RunningPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    plane.create_org("acme")
    monkeypatch.setattr(connection, "WELCOME_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # completes TCP handshakes (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        agent = LiveAgent.enrolled(plane, load=ScriptedLoad([(0.0, OwnerLoad(0.0))]))
        address = agent.config.plane
        agent.config = agent.config.replace(planes=(f"127.0.0.1:{silent.getsockname()[1]}", address))
        try:
            agent.start()
            eventually(lambda: agent.agent is not None and agent.agent.plane == address, 10, "the agent's Welcome")
        finally:
            agent.stop()


# -- the config file and enrollment ------------------------------------------------------------------


def test_a_config_file_with_a_single_plane_still_loads_and_is_written_as_before(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    old = {
        "plane": "plane.example.com:8443",
        "node_id": "node_1",
        "credential": "hwn-x",
        "ca_pem": "",
        "name": "lab-box",
        "machine_id": "m",
        "insecure": False,
        "mode": "always-on",
        "idle": {"cpu_percent": 50, "gpu_percent": 30, "pause_after_s": 5, "resume_after_s": 60},
        "models": [],
    }
    path.write_text(json.dumps(old))
    config = AgentConfig.load(path)
    assert config.planes == ("plane.example.com:8443",) and config.plane == "plane.example.com:8443"
    config.save(path)
    assert json.loads(path.read_text()) == old  # an older agent reads it as it always did


def test_a_config_file_with_several_planes_keeps_their_order_with_plane_first(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    AgentConfig(planes=("a:1", "b:2", "c:3"), node_id="n", credential="c").save(path)
    doc = json.loads(path.read_text())
    assert doc["plane"] == "a:1" and doc["planes"] == ["a:1", "b:2", "c:3"]
    doc["plane"] = "c:3"  # a hand edit of `plane` alone: that plane first, the others after it
    path.write_text(json.dumps(doc))
    assert AgentConfig.load(path).planes == ("c:3", "a:1", "b:2")


def test_an_insecure_agent_sends_its_credential_to_any_plane_of_its_config_and_no_other() -> None:
    config = AgentConfig(planes=("127.0.0.1:1", "127.0.0.1:2"), credential="hwn-x", insecure=True)
    assert previous_credential(config, "127.0.0.1:2", "hwt-x", insecure=True) == "hwn-x"
    assert previous_credential(config, "127.0.0.1:3", "hwt-x", insecure=True) == ""


def test_a_token_carries_the_plane_list_and_an_old_token_none() -> None:
    token = join_enrollment_token("hwt-secret", "ab" * 32, ["plane-a.example.com:8443", "[::1]:8443"])
    assert split_enrollment_token(token) == ("hwt-secret", "ab" * 32)
    assert enrollment_token_planes(token) == ("plane-a.example.com:8443", "[::1]:8443")
    assert enrollment_token_planes(join_enrollment_token("hwt-secret", "ab" * 32)) == ()
    for mangled in ("!!!!", base64.urlsafe_b64encode(b"no-port").decode()):
        with pytest.raises(ValueError, match="plane list"):
            enrollment_token_planes(f"hwt-secret.{'ab' * 32}.{mangled}")


@pytest.fixture
def other_plane(plane_config: Config, loop_thread: LoopThread, tmp_path: Path) -> Iterator[Server]:
    """A plane of another gateway: its own data dir, so its own node certificate."""

    async def start() -> Server:
        server = Server(plane_config.replace(data_dir=tmp_path / "other"))
        await server.startup()
        return server

    server = loop_thread.run(start())
    yield server
    loop_thread.run(server.shutdown())


def enroll(agent: AgentProcess, token: str, *planes: str) -> subprocess.CompletedProcess[str]:
    return agent_cli("enroll", "--token", token, "--name", agent.name, *planes, config=agent.config)


def node_token(plane: RunningPlane, **fields: object) -> str:
    return str(plane.admin.post("/node-tokens", {"org": "acme", **fields})["token"])


def test_enrolling_with_repeated_planes_stores_them_all_in_order(plane: RunningPlane, tmp_path: Path) -> None:
    plane.create_org("acme")
    # Two addresses of the same plane: both answer with the certificate the token pins.
    port = plane.server.plane.grpc_port
    first, second, third = f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1:1"
    agent = AgentProcess(tmp_path, "node-a")
    result = enroll(agent, node_token(plane), "--plane", first, "--plane", f"{second},{third}")
    assert result.returncode == 0, describe(result)
    assert AgentConfig.load(agent.config).planes == (first, second, third)
    assert "127.0.0.1:1 is not answering now" in result.stderr  # kept, with a warning


def test_enrolling_with_the_token_alone_stores_the_planes_it_carries(plane: RunningPlane, tmp_path: Path) -> None:
    plane.create_org("acme")
    port = plane.server.plane.grpc_port
    planes = [f"127.0.0.1:{port}", f"localhost:{port}"]
    token = node_token(plane, planes=planes)
    agent = AgentProcess(tmp_path, "node-a")
    result = enroll(agent, token)
    assert result.returncode == 0, describe(result)
    assert AgentConfig.load(agent.config).planes == tuple(planes)


def test_a_plane_presenting_another_certificate_stops_the_enrollment_before_the_token_is_spent(
    plane: RunningPlane, other_plane: Server, tmp_path: Path
) -> None:
    plane.create_org("acme")
    token = node_token(plane)
    agent = AgentProcess(tmp_path, "node-a")
    mine, other = f"127.0.0.1:{plane.server.plane.grpc_port}", f"127.0.0.1:{other_plane.plane.grpc_port}"
    refused = enroll(agent, token, "--plane", mine, "--plane", other)
    assert refused.returncode == 1 and "does not match the token" in refused.stderr, describe(refused)
    assert not agent.config.exists()
    assert agent.enroll(mine, token).returncode == 0  # the token is still good


def test_a_token_with_a_malformed_plane_address_is_refused(plane: RunningPlane) -> None:
    plane.create_org("acme")
    with pytest.raises(Exception, match="HOST:PORT"):
        node_token(plane, planes=["no-port"])
    assert enrollment_token_planes(node_token(plane, planes=["plane-b:8443", "plane-b:8443"])) == ("plane-b:8443",)


def test_the_admin_cli_puts_repeated_planes_in_the_token(plane: RunningPlane) -> None:
    plane.create_org("acme")
    args = ["nodes", "token", "create", "--org", "acme", "--plane", "plane-a:8443", "--plane", "plane-b:8443"]
    created = CliRunner().invoke(
        cli, ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, "--json", *args], catch_exceptions=False
    )
    assert created.exit_code == 0, created.output
    assert enrollment_token_planes(json.loads(created.output)["token"]) == ("plane-a:8443", "plane-b:8443")
