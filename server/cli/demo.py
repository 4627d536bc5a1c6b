"""`hatchway demo`: the plane plus a local agent serving the bundled demo model, ready for a curl.

What `make run` starts. It sets up an org `demo` with a fresh API key, enrolls a local agent (a subprocess of
`hatchway-agent`, talking to the plane over real gRPC with TLS, as any node would), waits until the node serves
the model, prints a curl command that answers through it and a one-time link that makes a plane admin account for
the console, and stops both on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from datetime import timedelta

import click

from proto.contract import join_enrollment_token
from server.config import Config
from server.credentials import ENROLLMENT_TOKEN_PREFIX, generate_key, hash_key
from server.errors import ConflictError
from server.plane import Plane
from server.serving.serve import Server
from server.storage.models import utcnow

DEMO_ORG = "demo"
DEMO_MODEL = "smollm2-135m-instruct"
# The console account the demo invites (a plane admin); on a later `make run` it exists and is not invited again.
DEMO_ADMIN_EMAIL = "admin@localhost"
DEMO_INVITATION_TTL = timedelta(hours=1)
NODE_READY_TIMEOUT_S = 120.0


def agent_command() -> list[str]:
    """The agent installed beside this Python (same virtualenv), run as its own process."""
    return [sys.executable, "-m", "agent"]


async def run_demo(config: Config) -> None:
    server = Server(config)
    await server.startup()
    plane = server.plane
    agent: asyncio.subprocess.Process | None = None
    try:
        with contextlib.suppress(ConflictError):
            await asyncio.to_thread(plane.store.create_org, DEMO_ORG)
        key = (await asyncio.to_thread(plane.store.create_key, DEMO_ORG, "make run"))["key"]
        secret = generate_key(ENROLLMENT_TOKEN_PREFIX)
        await asyncio.to_thread(plane.nodes.create_token, DEMO_ORG, secret, ttl_s=600, uses=1, labels={})
        await plane.snapshots.reload()
        agent_config = config.data_dir / "agent.json"
        plane_address = f"{config.host}:{plane.grpc_port}"
        token = join_enrollment_token(secret, plane.tls.fingerprint)
        enroll = [*agent_command(), "enroll", "--plane", plane_address, "--token", token, "--name", "local"]
        enrolling = await asyncio.create_subprocess_exec(*enroll, "--config", str(agent_config))
        if await enrolling.wait() != 0:
            raise click.ClickException("the local agent could not enroll (see above)")
        agent = await asyncio.create_subprocess_exec(*agent_command(), "run", "--demo", "--config", str(agent_config))
        org_id = next(i for i, name in plane.snapshots.current.org_names.items() if name == DEMO_ORG)
        async with asyncio.timeout(NODE_READY_TIMEOUT_S):
            while not plane.registry.serves(org_id, DEMO_MODEL):
                if agent.returncode is not None:
                    raise click.ClickException(f"the local agent exited with {agent.returncode}")
                await asyncio.sleep(0.2)
        _print_ready(server.url, key, await asyncio.to_thread(_console_invitation, plane, server.url))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if agent is not None and agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
            await asyncio.wait_for(agent.wait(), 30)
        await server.shutdown()


def _console_invitation(plane: Plane, url: str) -> str | None:
    """A one-time link that makes the demo's plane admin account (None when it exists from an earlier run)."""
    from server.accounts.http import INVITATION_PAGE, INVITATION_TOKEN_PREFIX
    from server.accounts.roles import PLANE_ADMIN
    from server.accounts.store import AccountStore

    token = generate_key(INVITATION_TOKEN_PREFIX)
    try:
        AccountStore(plane.engine).create_invitation(
            DEMO_ADMIN_EMAIL, PLANE_ADMIN, None, "make run", hash_key(token), utcnow() + DEMO_INVITATION_TTL
        )
    except ConflictError:
        return None
    return f"{url}{INVITATION_PAGE}#token={token}"


def _print_ready(url: str, key: str, invitation: str | None) -> None:
    console = (
        f"Open this link within an hour to make the console's admin account ({DEMO_ADMIN_EMAIL}):\n  {invitation}"
        if invitation
        else f"Sign in as {DEMO_ADMIN_EMAIL} (made by an earlier run)."
    )
    body = (
        '{"model": "' + DEMO_MODEL + '", "messages": [{"role": "system", "content": "Answer the question."}, '
        '{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}'
    )
    click.echo(
        f"""
Hatchway is up at {url} with a local node serving {DEMO_MODEL}.
API key for org '{DEMO_ORG}' (shown once): {key}

Try it:

  curl {url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{body}'

Console: {url}/console/
{console}

Press Ctrl-C to stop.
""",
        err=False,
    )
