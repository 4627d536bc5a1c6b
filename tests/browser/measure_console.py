"""What the console costs the plane, measured (docs/console.md quotes the figures):

    .venv/bin/python -m tests.browser.measure_console [--runs 7]

1. `hatchway serve` started in a fresh process, with and without the console's routes (HATCHWAY_MEASURE_NO_CONSOLE
   makes `server.console.add_routes` register nothing): seconds until /readyz answers, and the process's RSS then.
2. One page load in Chromium, signed in, first visit and again: the requests the browser made, and their bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, PASSWORD
from tests.conftest import ADMIN_KEY, free_port

# Run by the child process in place of `hatchway serve`: the same entry point, the console's routes optionally off.
CHILD = """
import os, sys
if os.environ.get("HATCHWAY_MEASURE_NO_CONSOLE"):
    import server.console
    server.console.add_routes = lambda app: None
from server.cli import main
sys.argv = ["hatchway", "serve"]
main()
"""


def start_once(console: bool, data_dir: Path) -> tuple[float, int]:
    port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "HATCHWAY_PORT": str(port),
        "HATCHWAY_GRPC_PORT": str(grpc_port),
        "HATCHWAY_DATA_DIR": str(data_dir),
        "HATCHWAY_ADMIN_KEY": ADMIN_KEY,
    }
    if not console:
        env["HATCHWAY_MEASURE_NO_CONSOLE"] = "1"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("the plane exited")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        rss = psutil.Process(proc.pid).memory_info().rss
        served = httpx.get(f"http://127.0.0.1:{port}/console/").status_code
        assert served == (200 if console else 404), served
        return elapsed, rss
    finally:
        proc.terminate()
        proc.wait(20)


def measure_start(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for console in (False, True, False, True):  # warm the disk cache for both before the counted runs
            start_once(console, Path(tmp) / "warm")
        results: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
        for i in range(runs):
            for console in (False, True):
                results[console].append(start_once(console, Path(tmp) / f"run-{i}-{console}"))
    for console, label in ((False, "without the console"), (True, "with the console")):
        times = [t for t, _ in results[console]]
        rss = [r for _, r in results[console]]
        print(
            f"{label:22} start to /readyz: median {statistics.median(times) * 1000:.0f} ms "
            f"(min {min(times) * 1000:.0f}); RSS median {statistics.median(rss) / 2**20:.1f} MiB"
        )


def plane_requests(url: str) -> dict[str, int]:
    """Requests the plane has answered, by route, from its own counters (/metrics)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("hatchway_requests_total{"):
            route = line.split('route="')[1].split('"')[0]
            counts[route] = counts.get(route, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def difference(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    changed = {route: after[route] - before.get(route, 0) for route in after if after[route] != before.get(route, 0)}
    # The scrape that read `before` is counted in `after`.
    changed["/metrics"] = changed.get("/metrics", 0) - 1
    return {route: n for route, n in changed.items() if n}


def measure_page_load() -> None:
    from playwright.sync_api import Page, Request, sync_playwright

    from server.config import Config
    from server.serving.serve import Server
    from tests.support.loop_thread import LoopThread

    with tempfile.TemporaryDirectory() as tmp:
        loop = LoopThread()
        config = Config(port=0, grpc_port=0, data_dir=Path(tmp), admin_key=ADMIN_KEY, overload_lag_ms=0)

        async def start() -> Server:
            server = Server(config)
            await server.startup()
            return server

        server = loop.run(start())
        try:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            httpx.post(f"{server.url}/admin/v1/orgs", json={"name": "acme"}, headers=admin)
            account = {"email": "admin@example.com", "role": "org_admin", "org_id": "acme", "password": PASSWORD}
            httpx.post(f"{server.url}/admin/v1/accounts", json=account, headers=admin)
            elsewhere: list[str] = []

            def watch(request: Request) -> None:
                if not request.url.startswith((server.url, "data:", "blob:", "about:")):
                    elsewhere.append(request.url)

            def signed_in(page: Page) -> None:
                page.get_by_label("Email").fill(account["email"])
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Sign in").click()
                page.locator("figure.chart").first.wait_for()
                page.wait_for_load_state("networkidle")

            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_context().new_page()
                page.on("request", watch)
                before = plane_requests(server.url)
                page.goto(f"{server.url}/console/")
                signed_in(page)
                first = difference(before, plane_requests(server.url))
                before = plane_requests(server.url)
                page.reload()
                page.locator("figure.chart").first.wait_for()
                page.wait_for_load_state("networkidle")
                again = difference(before, plane_requests(server.url))
                browser.close()
            for label, seen in (("first visit, signing in, to the overview", first), ("reload (signed in)", again)):
                assets = seen.get("/console/assets/{version}/{path}", 0)
                print(f"{label}: {sum(seen.values())} requests to the plane ({assets} assets): {seen}")
            print(f"requests to any other host: {len(elsewhere)}")
        finally:
            loop.run(server.shutdown())
            loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    measure_start(args.runs)
    measure_page_load()


if __name__ == "__main__":
    main()
