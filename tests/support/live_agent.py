"""The real agent session code (agent.connection.Agent) run in the test's process, on a loop of its own, with no
model loaded and a scripted owner's load: for what the session does (idle-only pauses, keepalive), not what the
engine does (tests/support/agent_process.py runs the whole agent with the real model)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agent.config import AgentConfig
from agent.connection import Agent, enroll
from agent.engine import Engine
from agent.idle import OwnerLoad
from server.nodes.registry import NodeSession
from tests.conftest import RunningPlane, eventually
from tests.support.loop_thread import LoopThread


class ScriptedLoad:
    """A load source (agent.idle.LoadProbe): the load of the last step whose time (`now`, set by whoever drives
    it) has come; `set` replaces the script with one load from now on."""

    def __init__(self, steps: list[tuple[float, OwnerLoad]]) -> None:
        self.steps = steps
        self.now = 0.0

    def set(self, load: OwnerLoad) -> None:
        self.steps = [(0.0, load)]

    def __call__(self) -> OwnerLoad:
        return [load for at, load in self.steps if at <= self.now][-1]


class LiveAgent:
    """An agent enrolled in org `acme` of `plane`, dialling `address` (the plane's node port unless given)."""

    def __init__(self, plane: RunningPlane, config: AgentConfig, load: ScriptedLoad, loop: LoopThread) -> None:
        self.plane = plane
        self.config = config
        self.load = load
        self.loop = loop
        self.agent: Agent | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def enrolled(
        cls, plane: RunningPlane, *, load: ScriptedLoad, address: str | None = None, **config: Any
    ) -> LiveAgent:
        token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
        address = address or f"127.0.0.1:{plane.server.plane.grpc_port}"
        loop = LoopThread(timeout_s=60)
        response, ca_pem = loop.run(enroll(address, token, name="live", machine_id="live-machine", insecure=False))
        agent_config = AgentConfig(
            planes=(address,),
            node_id=response.node_id,
            credential=response.credential,
            ca_pem=ca_pem,
            name="live",
            machine_id="live-machine",
            **config,
        )
        return cls(plane, agent_config, load, loop)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def session(self) -> NodeSession:
        return self.plane.server.plane.registry.sessions[self.node_id]

    def connected(self) -> bool:
        return self.node_id in self.plane.server.plane.registry.sessions

    def start(self, **options: Any) -> None:
        """Run the agent (options go to Agent) until `stop`; returns once the plane has its session."""

        async def begin() -> None:
            self._stop = asyncio.Event()
            self.agent = Agent(self.config, Engine([]), probe=self.load, **options)
            self._task = asyncio.get_running_loop().create_task(self.agent.run(self._stop))

        self.loop.run(begin())
        eventually(self.connected, what="the agent to connect")

    def stop(self) -> None:
        async def end() -> None:
            if self._stop is not None and self._task is not None:
                self._stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._task, 20)

        self.loop.run(end())
        self.loop.close()
