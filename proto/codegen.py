"""Generate the Python modules for proto/ (run from the repository root: `make proto`).

protoc runs with `-I .` so the generated modules import each other as `proto.hatchway.node.v1...`, the path
`server` and `agent` import them by.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path = ROOT) -> int:
    """Write the modules under `out` (the repository root, or a scratch folder to compare against)."""
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    args = ["protoc", "-I", str(ROOT), "--python_out", str(out), "--pyi_out", str(out)]
    args += ["--grpc_python_out", str(out), *protos]
    return int(protoc.main(args))


if __name__ == "__main__":
    sys.exit(generate())
