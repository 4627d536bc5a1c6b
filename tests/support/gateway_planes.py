"""Several `hatchway serve` processes making one gateway, for tests and benchmarks of what a plane's death does.

The planes share what issue 17 says planes of one gateway share: one PostgreSQL database, one secret key, one
admin key, and one node certificate (copied into each plane's data dir, as a data dir mounted on every plane
would give it). Each has its own data dir otherwise (its usage spool, its logs), and may be killed and started
again on the same ports, so agents that know its address find it again.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx

from server.cli.client import AdminClient
from server.nodes.tls import load_or_create
from tests.conftest import ADMIN_KEY
from tests.support.plane_process import PlaneProcess

NODE_SERVICE = re.compile(r"Node service listening on \S+:(\d+)")
SECRET_KEY = "one-secret-for-every-plane"
NODE_CERTIFICATE_FILES = ("node-ca.pem", "node-ca.key")


def share_node_certificate(data_dirs: list[Path]) -> None:
    """One node certificate in every data dir: the first plane's, made now if it has none."""
    load_or_create(data_dirs[0])
    for data_dir in data_dirs[1:]:
        data_dir.mkdir(parents=True, exist_ok=True)
        for name in NODE_CERTIFICATE_FILES:
            shutil.copy2(data_dirs[0] / name, data_dir / name)


class GatewayPlane:
    """One plane process of the gateway; `kill` and `start` again keep its ports."""

    def __init__(self, data_dir: Path, database_url: str, *, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {
            "HATCHWAY_DATABASE_URL": database_url,
            "HATCHWAY_SECRET_KEY": SECRET_KEY,
            "HATCHWAY_ADMIN_KEY": ADMIN_KEY,
            **(env or {}),
        }
        self.port = 0
        self.grpc_port = 0
        self.process: PlaneProcess | None = None
        self.admin = AdminClient("http://unused", ADMIN_KEY)
        self.start()

    def start(self) -> None:
        env = {**self.env, "HATCHWAY_GRPC_PORT": str(self.grpc_port)}
        self.process = PlaneProcess(self.data_dir, "--port", str(self.port), env=env)
        self.grpc_port = int(self.process.wait_for(NODE_SERVICE).group(1))
        self.port = int(self.process.url.rpartition(":")[2])
        self.admin.close()
        self.admin = AdminClient(self.url, ADMIN_KEY)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def node_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def output(self) -> str:
        return self.process.output if self.process is not None else ""

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; the kernel resets its connections."""
        assert self.process is not None
        self.process.kill()

    def close(self) -> None:
        self.admin.close()
        if self.process is not None and self.process.proc.poll() is None:
            self.process.terminate()
        elif self.process is not None:
            self.process.kill()  # closes its output reader


def chat(url: str, key: str, body: dict[str, object], timeout_s: float = 30) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s
    )
