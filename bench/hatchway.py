"""Hatchway under test: `hatchway serve` as a pinned subprocess, set up over the admin API like an admin would.

`configure` is the one place where the benchmarks' plane gets its policy: API-key auth, a routing rule per
model, prices (so every request is costed) and usage accounting (always on); with `policy`, also rate limits
and quotas on the org and the key (generous, so they cost their bookkeeping but refuse nothing) and a cache
lookup on every request (`enable_policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from harness import HOST, REPO_ROOT, BenchError, Child, Pinning, child_env, child_process, wait_for_match, wait_for_port
from upstream import UPSTREAM_MODEL, Upstream

ADMIN_KEY = "hwa-bench-admin-key"
# /metrics takes the admin key.
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
ORG = "bench"
MOCK_KEY = "sk-mock"
# The model a client names for each answer of the mock upstream (see bench/upstream.py).
MODELS = {"json": "bench-json", "sse": "bench-sse", "slow-json": "bench-slow-json", "slow-sse": "bench-slow-sse"}
PRICE_IN, PRICE_OUT = 0.15, 0.60  # USD per 1M tokens: every request gets a cost in the usage rows
GRPC_LISTENING = re.compile(r"Node service listening on \S+:(\d+)")
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Plane:
    child: Child
    url: str
    grpc_address: str
    # Spawn to the first 200 from /readyz: "ready to serve".
    ready_s: float = 0.0
    api_key: str = ""
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.child.pid


def hatchway_binary() -> Path:
    path = Path(sys.executable).parent / "hatchway"
    if not path.exists():
        raise BenchError(f"{path} not found: run `make install` first")
    return path


def start_plane(
    stack: contextlib.ExitStack,
    workdir: Path,
    pinning: Pinning | None,
    name: str = "plane",
    source: Path | None = None,
    **settings: str,
) -> Plane:
    """Start `hatchway serve` (on the SUT CPU when pinned); `settings` become HATCHWAY_* variables. `source`: a
    checkout of another version to run instead of the installed one, with this virtualenv's packages (`-m server`
    from that folder imports its `server` before the installed one)."""
    name = file_name(name)
    data_dir = workdir / f"{name}-data"
    data_dir.mkdir()
    program = [sys.executable, "-m", "server"] if source is not None else [str(hatchway_binary())]
    argv = [*program, "serve", "--host", HOST, "--port", "0", "--grpc-port", "0", "--data-dir", str(data_dir)]
    # The load generator is one address standing in for many clients: no cap on connections per address.
    env = child_env(HATCHWAY_ADMIN_KEY=ADMIN_KEY, HATCHWAY_LOG_LEVEL="warning", HATCHWAY_MAX_CONNECTIONS_PER_IP="0")
    env.update({f"HATCHWAY_{key.upper()}": value for key, value in settings.items()})
    argv = pinning.sut(argv) if pinning is not None else argv
    log_path = workdir / f"{name}.log"
    child = stack.enter_context(child_process("hatchway plane", argv, log_path, env, cwd=source or REPO_ROOT))
    port = wait_for_port(child, STARTUP_TIMEOUT_S)
    grpc_port = int(wait_for_match(child, GRPC_LISTENING, 10.0).group(1))
    return Plane(child, f"http://{HOST}:{port}", f"{HOST}:{grpc_port}")


def file_name(text: str) -> str:
    """`text` (a contender's name, a git ref) made safe to put in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def checkout(stack: contextlib.ExitStack, workdir: Path, ref: str) -> Path:
    """A detached git worktree of `ref` under `workdir`, removed again when `stack` closes."""
    path = workdir / f"checkout-{file_name(ref)}"
    git = ["git", "-C", str(REPO_ROOT)]
    done = subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(path), ref], capture_output=True)
    if done.returncode != 0:
        raise BenchError(f"cannot check out {ref!r}: {done.stderr.decode().strip()}")
    stack.callback(subprocess.run, [*git, "worktree", "remove", "--force", str(path)], capture_output=True)
    return path


async def wait_ready(session: aiohttp.ClientSession, plane: Plane, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll /readyz until 200; records the time from spawn to ready in `plane.ready_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        plane.child.check_alive()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{plane.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    plane.ready_s = time.perf_counter() - plane.child.started_at
                    return
        await asyncio.sleep(0.01)
    raise BenchError(f"{plane.url}/readyz not 200 within {timeout_s:.0f}s:\n{plane.child.log_tail()}")


async def admin(
    session: aiohttp.ClientSession, plane: Plane, method: str, path: str, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with session.request(method, plane.url + path, json=payload, headers=headers, timeout=timeout) as resp:
        text = await resp.text()
        if resp.status not in (200, 201):
            raise BenchError(f"{method} {path} -> {resp.status}: {text[:500]}")
    data = orjson.loads(text)
    if not isinstance(data, dict):
        raise BenchError(f"{method} {path} returned {text[:200]!r}, not an object")
    return data


async def configure(
    session: aiohttp.ClientSession, plane: Plane, upstream: Upstream | None, *, policy: bool = True
) -> str:
    """The bench org, its API key, and (with an upstream) one provider per mock answer with a routing rule;
    with `policy`, limits, quotas and cache lookups too, else none of them (the cache off).

    Returns the API key's secret (also kept in `plane.api_key`).
    """
    await admin(session, plane, "POST", "/admin/v1/orgs", {"name": ORG})
    created = await admin(session, plane, "POST", "/admin/v1/keys", {"org": ORG, "name": "bench"})
    secret = created.get("key")
    if not isinstance(secret, str) or not secret:
        raise BenchError(f"POST /admin/v1/keys returned no 'key' secret: {created}")
    plane.api_key = secret
    plane.setup = {"auth": "API key (Bearer)", "accounting": "usage rows, batch writer (always on)"}
    if upstream is not None:
        for answer, model in MODELS.items():
            provider = {
                "org": ORG,
                "name": f"mock-{answer}",
                "base_url": upstream.url(answer),
                "api_keys": [MOCK_KEY],
                "models": [{"alias": model, "upstream": UPSTREAM_MODEL}],
                "price_in": PRICE_IN,
                "price_out": PRICE_OUT,
            }
            await admin(session, plane, "POST", "/admin/v1/providers", provider)
            rule = {"org": ORG, "model": model, "strategy": "priority", "targets": [f"mock-{answer}"]}
            await admin(session, plane, "PUT", "/admin/v1/routes", rule)
        plane.setup["routing"] = "a priority rule per model, one provider each"
        plane.setup["prices"] = f"{PRICE_IN}/{PRICE_OUT} USD per 1M tokens in/out"
    if policy:
        plane.setup["policy"] = await enable_policy(session, plane, str(created["id"]))
    else:
        await admin(session, plane, "PUT", "/admin/v1/cache", {"org": ORG, "mode": "off"})
        plane.setup["policy"] = "none: no limits or quotas, cache off"
    return secret


# Far above anything the benchmarks send: the limiter does all its bookkeeping but never refuses.
GENEROUS_LIMITS = {
    "rpm": 10**9,
    "tpm": 10**12,
    "concurrency": 10**6,
    "tokens_per_day": 10**13,
    "tokens_per_month": 10**14,
    "usd_per_day": 10**8,
    "usd_per_month": 10**9,
}


async def enable_policy(session: aiohttp.ClientSession, plane: Plane, key_id: str) -> str:
    """Every limit kind on both the org and the key, and a cache lookup for every request (mode `all`, TTL 0:
    each request's canonical form is hashed and looked up, and nothing is stored, so every request still goes
    upstream). Returns a short description for the results."""
    await admin(session, plane, "PUT", "/admin/v1/limits", {"org": ORG, **GENEROUS_LIMITS})
    await admin(session, plane, "PUT", "/admin/v1/limits", {"key": key_id, **GENEROUS_LIMITS})
    await admin(session, plane, "PUT", "/admin/v1/cache", {"org": ORG, "mode": "all", "ttl_s": 0})
    return "rpm, tpm, concurrency and token/USD quotas on org and key (never reached); cache lookup on every request"


async def node_token(session: aiohttp.ClientSession, plane: Plane, uses: int = 1) -> str:
    created = await admin(session, plane, "POST", "/admin/v1/node-tokens", {"org": ORG, "uses": uses})
    token = created.get("token")
    if not isinstance(token, str) or not token:
        raise BenchError(f"POST /admin/v1/node-tokens returned no 'token': {created}")
    return token


async def wait_for_model(
    session: aiohttp.ClientSession, plane: Plane, model: str, agent: Child | None = None, timeout_s: float = 120.0
) -> None:
    """Until the org's model list names `model`: an agent has loaded it and said Hello."""
    headers = {"Authorization": f"Bearer {plane.api_key}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent is not None:
            agent.check_alive()
        async with session.get(f"{plane.url}/v1/models", headers=headers) as resp:
            listing = await resp.json(loads=orjson.loads) if resp.status == 200 else {}
        if model in {entry.get("id") for entry in listing.get("data", [])}:
            return
        await asyncio.sleep(0.2)
    tail = agent.log_tail() if agent is not None else ""
    raise BenchError(f"{model} not listed by /v1/models within {timeout_s:.0f}s\n{tail}")


async def metrics_text(session: aiohttp.ClientSession, plane: Plane) -> str:
    async with session.get(f"{plane.url}/metrics", headers=ADMIN_HEADERS) as resp:
        return await resp.text()


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in Prometheus text, or None when the plane does not expose it."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            with contextlib.suppress(ValueError, IndexError):
                return float(line.rsplit(" ", 1)[1])
    return None
