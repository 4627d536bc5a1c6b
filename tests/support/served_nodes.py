"""Agents serving a test's plane: real `hatchway-agent` processes (tests/support/agent_process.py) enrolled into it
(`Nodes`), and what the node tests ask them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from server.config import Config
from server.nodes.registry import NodeRegistry
from tests.conftest import RunningPlane, eventually
from tests.support.agent_process import AgentProcess, describe

QUESTION = [
    {"role": "system", "content": "Answer the question."},
    {"role": "user", "content": "What is the capital of France?"},
]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def for_agents(config: Config) -> Config:
    """`config` for a plane that real agents serve: a heartbeat every half second (a node that left is seen at once),
    a short wait for a busy node's slot, and a first-token limit that llama.cpp meets on a loaded CPU."""
    return config.replace(node_heartbeat_s=0.5, node_queue_timeout_s=2.0, ttft_timeout_s=20.0)


@dataclass
class Nodes:
    plane: RunningPlane
    workdir: Path
    key: str
    agents: list[AgentProcess] = field(default_factory=list)
    _client: openai.OpenAI | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.plane.server.plane.grpc_port}"

    @property
    def registry(self) -> NodeRegistry:
        return self.plane.server.plane.registry

    def token(self, **fields: Any) -> str:
        return str(self.plane.admin.post("/node-tokens", {"org": "acme", **fields})["token"])

    def enrolled(self, name: str) -> AgentProcess:
        agent = AgentProcess(self.workdir, name)
        self.agents.append(agent)
        result = agent.enroll(self.address, self.token())
        assert result.returncode == 0, describe(result)
        return agent

    def started(self, name: str, *extra: str, slots: int = 1) -> AgentProcess:
        agent = self.enrolled(name)
        before = len(self.registry.sessions)
        agent.start(*extra, slots=slots)
        eventually(lambda: len(self.registry.sessions) > before, what=f"agent {name} to connect:\n{agent.output}")
        return agent

    def node_id(self, agent: AgentProcess) -> str:
        return str(json.loads(agent.config.read_text())["node_id"])

    def stream(self, body: dict[str, Any], *, after: int, then: Callable[[], None]) -> list[str]:
        """Stream a completion, do `then` once `after` SSE frames arrived, and return every frame."""
        frames: list[str] = []
        with httpx.stream(
            "POST", f"{self.plane.v1}/completions", json=body, headers={"Authorization": f"Bearer {self.key}"}
        ) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                frames.append(line)
                if len(frames) == after:
                    then()
        return frames

    def client(self) -> openai.OpenAI:
        if self._client is None:
            self._client = openai.OpenAI(base_url=self.plane.v1, api_key=self.key, max_retries=0)
        return self._client

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self._client is not None:
            self._client.close()


# Tests about what a node generates read it from the node, not from the plane's cache (greedy answers are cacheable).
NO_CACHE = {"X-Hatchway-Cache": "bypass"}


@contextlib.contextmanager
def enrolling(plane: RunningPlane, workdir: Path) -> Iterator[Nodes]:
    """Org `acme` of `plane` with an API key of its own, ready for agents to enroll; each one stopped at the end."""
    plane.create_org("acme")
    nodes = Nodes(plane, workdir, plane.create_key("acme"))
    try:
        yield nodes
    finally:
        nodes.close()


@contextlib.contextmanager
def one_node(plane: RunningPlane, tmp_path: Path) -> Iterator[Nodes]:
    """One agent serving the demo model for org `acme` of `plane`, with an API key of that org."""
    with enrolling(plane, tmp_path) as nodes:
        nodes.started("node-a")
        yield nodes


def strict_client(nodes: Nodes) -> openai.OpenAI:
    """The SDK checking every answer against its own models, past the plane's cache."""
    return openai.OpenAI(
        base_url=nodes.plane.v1,
        api_key=nodes.key,
        max_retries=0,
        default_headers=NO_CACHE,
        _strict_response_validation=True,
    )
