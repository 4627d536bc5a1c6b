"""Agent reconnect time after its plane is SIGKILLed: from the kill to the first request the node answers again.

    python bench/reconnect.py [--rounds N] [--results DIR]

Both scenarios run in one go, with the real agent (`hatchway-agent run --demo`, SmolLM2-135M) and planes as
`hatchway serve` processes on one fresh PostgreSQL database (this machine's, on its standard port), sharing the
secret key and the node certificate (tests/support/gateway_planes.py):

    failover   two planes; the agent was enrolled with both. Each round SIGKILLs the plane the agent is on and
               times kill -> the first chat completion (max_tokens 1) answered by the node through the other
               plane; the killed plane is then started again on its ports, and the next round kills the other.
    restart    the baseline, one plane (all a single-plane agent has): SIGKILL, start it again at once on the
               same ports, time kill -> the first completion answered by the node through it.

Requests are polled every 20 ms. Before each kill the agent's session is left to run HEALTHY_SESSION_S and a
second (agent/connection.py: a shorter session counts as a failed one, and a round of failures backs off), so
every round measures a healthy session's loss.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import REPO_ROOT, RESULTS_DIR, log, machine_info, percentile, write_json

sys.path.insert(0, str(REPO_ROOT))
from agent.config import AgentConfig
from agent.connection import HEALTHY_SESSION_S
from tests.server.storage.test_postgres import scratch_database
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe
from tests.support.gateway_planes import GatewayPlane, chat, share_node_certificate

FULL_ROUNDS, POLL_S, GIVE_UP_S = 10, 0.02, 60.0
BODY = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


@contextmanager
def gateway(workdir: Path, database: str, planes: int) -> Iterator[list[GatewayPlane]]:
    dirs = [workdir / f"plane-{i}" for i in range(planes)]
    share_node_certificate(dirs)
    started: list[GatewayPlane] = []
    try:
        for data_dir in dirs:  # one after the other: the first migrates the empty database
            started.append(GatewayPlane(data_dir, database, env={"HATCHWAY_LOG_LEVEL": "warning"}))
        yield started
    finally:
        for plane in started:
            plane.close()


def served_by_node(url: str, key: str, node_id: str) -> bool:
    try:
        response = chat(url, key, BODY, timeout_s=10)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.headers.get("x-hatchway-route") == node_id


def wait_served(url: str, key: str, node_id: str, since: float) -> float:
    while not served_by_node(url, key, node_id):
        if time.monotonic() - since > GIVE_UP_S:
            raise RuntimeError(f"the node was not served through {url} {GIVE_UP_S:.0f}s after the kill")
        time.sleep(POLL_S)
    return time.monotonic() - since


def scenario(workdir: Path, planes: int, rounds: int) -> list[float]:
    """Seconds from each kill to the node's first answer again."""
    timings: list[float] = []
    with scratch_database() as database, gateway(workdir, database, planes) as gw:
        admin = gw[0].admin
        admin.post("/orgs", {"name": "acme"})
        key = str(admin.post("/keys", {"org": "acme"})["key"])
        others = [p.node_address for p in gw[1:]]
        token = str(admin.post("/node-tokens", {"org": "acme", "planes": others})["token"])
        agent = AgentProcess(workdir, f"node-{planes}")
        enrolled = agent.enroll(gw[0].node_address, token)
        if enrolled.returncode != 0:
            raise RuntimeError(describe(enrolled))
        node_id = AgentConfig.load(agent.config).node_id
        agent.start()
        try:
            on = 0  # the plane the agent is on
            wait_served(gw[on].url, key, node_id, time.monotonic())
            for number in range(rounds):
                time.sleep(HEALTHY_SESSION_S + 1)
                killed = time.monotonic()
                gw[on].kill()
                if planes == 1:
                    gw[on].start()
                    took = wait_served(gw[on].url, key, node_id, killed)
                else:
                    dead, on = on, (on + 1) % planes
                    took = wait_served(gw[on].url, key, node_id, killed)
                    gw[dead].start()
                timings.append(took)
                log(f"{planes} plane(s), round {number + 1}/{rounds}: served again after {took:.3f}s")
        finally:
            agent.stop()
    return timings


def figures(timings: list[float]) -> dict[str, Any]:
    return {
        "p50_s": round(percentile(timings, 50), 3),
        "max_s": round(max(timings, default=0.0), 3),
        "runs_s": [round(t, 3) for t in timings],
    }


def bench(rounds: int, workdir: Path) -> dict[str, Any]:
    return {
        "machine": machine_info(),
        "rounds": rounds,
        "poll_s": POLL_S,
        "failover_two_planes": figures(scenario(workdir / "failover", 2, rounds)),
        "restart_one_plane": figures(scenario(workdir / "restart", 1, rounds)),
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'kill -> node served again (' + str(report['rounds']) + ' rounds)':<52} {'p50 s':>8} {'max s':>8}"]
    for name, key in (
        ("2 planes: through the other plane", "failover_two_planes"),
        ("1 plane: restarted at once (baseline)", "restart_one_plane"),
    ):
        lines.append(f"{name:<52} {report[key]['p50_s']:>8.3f} {report[key]['max_s']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=FULL_ROUNDS, help="kills per scenario")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where reconnect.json goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hatchway-reconnect-") as workdir:
        report = bench(args.rounds, Path(workdir))
    print(format_table(report))
    write_json(args.results / "reconnect.json", report)


if __name__ == "__main__":
    main()
