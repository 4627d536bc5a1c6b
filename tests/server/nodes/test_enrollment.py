"""Who may take an existing node's id: only the machine holding its credential, or one an admin's token names
(`--replace NODE`). A token and another node's machine id get a new node, and the real node serves on."""

from __future__ import annotations

import json
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from click.testing import CliRunner

from agent.config import AgentConfig
from agent.connection import previous_credential
from proto.contract import join_enrollment_token
from server.cli import cli
from server.config import Config
from server.credentials import hash_key
from tests.conftest import ADMIN_KEY, RunningPlane, eventually
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe
from tests.support.hostile_agent import HostileAgent, Refused, hello
from tests.support.loop_thread import LoopThread
from tests.support.served_nodes import QUESTION

T = TypeVar("T")
REPLACE_LAB_BOX = ("nodes", "token", "create", "--org", "acme", "--replace", "lab-box")


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return plane_config.replace(node_heartbeat_s=0.5, ttft_timeout_s=20.0)


@dataclass
class Enrollment:
    plane: RunningPlane
    loop: LoopThread
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.plane.server.plane.grpc_port}"

    def token(self, org: str = "acme", **fields: object) -> str:
        return str(self.plane.admin.post("/node-tokens", {"org": org, **fields})["token"])

    def agent(self, org: str = "acme", **fields: object) -> HostileAgent:
        return HostileAgent(self.address, self.token(org, **fields))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)

    def credential_works(self, credential: str) -> bool:
        return hash_key(credential) in self.plane.server.plane.snapshots.current.nodes

    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.plane.admin.get("/nodes")["data"]]


@pytest.fixture
def enrollment(plane: RunningPlane, tmp_path: Path) -> Iterator[Enrollment]:
    plane.create_org("acme")
    loop = LoopThread(timeout_s=60)
    yield Enrollment(plane, loop, tmp_path)
    loop.close()


def test_a_second_token_with_another_nodes_machine_id_gets_a_new_node_and_the_real_one_serves_on(
    enrollment: Enrollment,
) -> None:
    real = AgentProcess(enrollment.workdir, "real-node")
    result = real.enroll(enrollment.address, enrollment.token())
    assert result.returncode == 0, describe(result)
    config = json.loads(real.config.read_text())
    registry = enrollment.plane.server.plane.registry
    real.start()
    try:
        eventually(lambda: config["node_id"] in registry.sessions, what=f"the real agent to connect:\n{real.output}")
        real_session = registry.sessions[config["node_id"]]

        thief = enrollment.agent()
        stolen = enrollment.run(thief.enroll(name="thief", machine_id=config["machine_id"]))
        session = enrollment.run(thief.connect(hello()))
        enrollment.run(session.start_reading())

        assert stolen.node_id != config["node_id"]
        assert sorted(enrollment.node_ids()) == sorted([config["node_id"], stolen.node_id])
        assert registry.sessions[config["node_id"]] is real_session and not real_session.closed
        assert enrollment.credential_works(config["credential"])
        listed = enrollment.plane.admin.get(f"/nodes/{config['node_id']}")
        assert listed["name"] == "real-node" and listed["state"] == "ready"
        key = enrollment.plane.create_key("acme")
        answer = httpx.post(
            f"{enrollment.plane.v1}/chat/completions",
            json={"model": DEMO_MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.headers["x-hatchway-route"] == config["node_id"]
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
        assert real.proc is not None and real.proc.poll() is None
        enrollment.run(session.close())
    finally:
        real.stop()


def test_re_enrolling_with_the_current_credential_keeps_the_node_id_and_replaces_the_credential(
    enrollment: Enrollment,
) -> None:
    first = enrollment.run(enrollment.agent().enroll())
    again = enrollment.run(enrollment.agent().enroll(previous_credential=first.credential))
    assert again.node_id == first.node_id
    assert enrollment.credential_works(again.credential)
    assert not enrollment.credential_works(first.credential)
    assert enrollment.node_ids() == [first.node_id]


def test_re_enrolling_ends_the_session_opened_with_the_old_credential(enrollment: Enrollment) -> None:
    agent = enrollment.agent()
    first = enrollment.run(agent.enroll())
    session = enrollment.run(agent.connect(hello()))
    enrollment.run(enrollment.agent().enroll(previous_credential=first.credential))
    assert enrollment.run(session.ended()).code == grpc.StatusCode.OK
    enrollment.run(session.close())


def test_a_revoked_nodes_credential_enrolls_a_new_node(enrollment: Enrollment) -> None:
    first = enrollment.run(enrollment.agent().enroll())
    enrollment.plane.admin.post(f"/nodes/{first.node_id}/revoke", {})
    again = enrollment.run(enrollment.agent().enroll(previous_credential=first.credential))
    assert again.node_id != first.node_id


def test_another_orgs_credential_enrolls_a_new_node(enrollment: Enrollment) -> None:
    enrollment.plane.create_org("other")
    first = enrollment.run(enrollment.agent().enroll())
    again = enrollment.run(enrollment.agent("other").enroll(previous_credential=first.credential))
    assert again.node_id != first.node_id and again.org == "other"
    assert enrollment.credential_works(first.credential)


def test_an_admin_replace_token_keeps_the_node_id_and_revokes_the_old_credential(enrollment: Enrollment) -> None:
    agent = enrollment.agent()
    first = enrollment.run(agent.enroll(name="lab-box", machine_id="old-machine"))
    session = enrollment.run(agent.connect(hello()))
    created = CliRunner().invoke(
        cli,
        ["admin", "--url", enrollment.plane.url, "--admin-key", ADMIN_KEY, "--json", *REPLACE_LAB_BOX],
        catch_exceptions=False,
    )
    assert created.exit_code == 0, created.output
    token = json.loads(created.output)
    assert token["replaces"] == first.node_id
    new_machine = HostileAgent(enrollment.address, token["token"])
    replaced = enrollment.run(new_machine.enroll(name="new-box", machine_id="new-machine"))
    assert replaced.node_id == first.node_id
    assert not enrollment.credential_works(first.credential)
    assert enrollment.run(session.ended()).code == grpc.StatusCode.OK
    with pytest.raises(Refused) as refused:
        enrollment.run(agent.connect(hello()))
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    enrollment.run(session.close())


def test_a_replace_token_must_name_a_node_of_its_org(enrollment: Enrollment) -> None:
    enrollment.plane.create_org("other")
    node = enrollment.run(enrollment.agent("other").enroll())
    response = httpx.post(
        f"{enrollment.plane.url}/admin/v1/node-tokens",
        json={"org": "acme", "replace": node.node_id},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "replace"


@pytest.mark.parametrize(
    "name",
    ["nul\x00byte", "line\nbreak", "x" * 65, "   ", "zero\u200bwidth"],
    ids=["nul", "newline", "long", "blank", "format"],
)
def test_a_node_name_outside_the_charset_or_length_is_refused(enrollment: Enrollment, name: str) -> None:
    with pytest.raises(Refused) as refused:
        enrollment.run(enrollment.agent().enroll(name=name))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "EnrollRequest.name" in refused.value.details
    assert enrollment.node_ids() == []


def test_a_printable_unicode_name_is_enrolled(enrollment: Enrollment) -> None:
    enrollment.run(enrollment.agent().enroll(name="Labor-Rechner Müller 2"))
    assert enrollment.plane.admin.get("/nodes")["data"][0]["name"] == "Labor-Rechner Müller 2"


def test_an_oversized_machine_id_is_refused(enrollment: Enrollment) -> None:
    with pytest.raises(Refused) as refused:
        enrollment.run(enrollment.agent().enroll(machine_id="m" * 3_000_000))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "machine_id" in refused.value.details


def test_the_agent_sends_its_credential_only_to_the_plane_it_enrolled_with(enrollment: Enrollment) -> None:
    agent = AgentProcess(enrollment.workdir, "node-a")
    token = enrollment.token()
    assert agent.enroll(enrollment.address, token).returncode == 0
    config = AgentConfig.load(agent.config)
    assert previous_credential(config, enrollment.address, enrollment.token(), insecure=False) == config.credential
    elsewhere = join_enrollment_token("hwe-secret", "0" * 64)
    assert previous_credential(config, enrollment.address, elsewhere, insecure=False) == ""
    assert previous_credential(config, enrollment.address, token, insecure=True) == ""
