"""The PyInstaller build of `hatchway-agent` (`make agent-binary`), and ways to run it as a stranger would."""

from __future__ import annotations

import functools
import glob
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO

BUILD = REPO / "dist" / "hatchway-agent"
EXECUTABLE = BUILD / "hatchway-agent"


@functools.cache
def agent_build() -> Path:
    """The build folder, made or brought up to date once per test session (make rebuilds only what changed)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "agent-binary"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"make agent-binary failed:\n{result.stdout}\n{result.stderr}"
    return BUILD


def python_installations() -> list[str]:
    """Every place a Python interpreter could take its standard library from on this machine."""
    places = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"]}
    places.update(glob.glob("/usr/lib/python3*") + glob.glob("/usr/local/lib/python3*"))
    found = [Path(p).resolve() for p in places if Path(p).is_dir()]
    # A place inside another is hidden with it (and could not be mounted on once that one is hidden).
    return sorted({str(p) for p in found if not any(p != q and p.is_relative_to(q) for q in found)})


def without_python(argv: list[str]) -> list[str]:
    """`argv`, run with every Python installation hidden under an empty tmpfs, in a mount namespace of its own
    (a user namespace makes that possible without privileges): the machine of a provider with no Python."""
    mounts = "".join(f"mount -t tmpfs none {shlex.quote(place)}; " for place in python_installations())
    script = f'set -e; {mounts}exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *argv]
