"""Carrying a `Plan` out on this system (`Executor`), with every path under a root (`/` unless writing an image)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from agent.service.plans import AwaitStopped, Chown, Command, MakeDir, Plan, RemoveFile, Step, WriteFile
from agent.service.spec import SERVICE_NAME, STOP_TIMEOUT_S, ServiceError, this_system
from agent.service.status import windows_state


def give_to(owner: str, path: Path, root: Path) -> None:
    if sys.platform == "win32":
        raise ServiceError("Windows services run as a virtual account, not as a named user")
    os.chown(path, *owner_ids(owner, root))


def owner_ids(owner: str, root: Path) -> tuple[int, int]:
    """uid and primary gid of `owner`, looked up in `root`'s own user database when it is not this system."""
    if sys.platform == "win32":
        raise ServiceError("Windows services run as a virtual account, not as a named user")
    if root == Path("/"):
        import pwd

        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            raise ServiceError(f"no user {owner!r} on this system: create it first, or pass --user") from None
        return entry.pw_uid, entry.pw_gid
    for line in (root / "etc" / "passwd").read_text().splitlines():
        name, _, uid, gid, *_ = [*line.split(":"), "", "", "", ""]
        if name == owner:
            return int(uid), int(gid)
    raise ServiceError(f"no user {owner!r} in {root / 'etc' / 'passwd'}")


class Executor:
    """Carries a plan out on this system, with every path under `root` (`/` unless writing an image)."""

    def __init__(self, root: Path = Path("/"), echo: Callable[[str], None] = click.echo) -> None:
        self.root = root
        self.echo = echo

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/") if this_system() != "windows" else Path(path)

    def apply(self, plan: Plan) -> None:
        for step in plan.steps:
            self.step(step)

    def step(self, step: Step) -> None:
        match step:
            case WriteFile(path, content, mode):
                target = self.path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_text(content)
                tmp.chmod(mode)
                os.replace(tmp, target)
            case RemoveFile(path):
                self.path(path).unlink(missing_ok=True)
            case MakeDir(path, mode, owner):
                target = self.path(path)
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(mode)
                if owner:
                    give_to(owner, target, self.root)
            case Chown(path, owner):
                target = self.path(path)
                if target.exists():
                    give_to(owner, target, self.root)
            case Command(argv, may_fail):
                self.run(argv, may_fail)
            case AwaitStopped(name, timeout_s):
                await_stopped(name, timeout_s)

    def run(self, argv: tuple[str, ...], may_fail: bool) -> None:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=STOP_TIMEOUT_S + 30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            if may_fail:
                return
            raise ServiceError(f"{argv[0]} could not run: {exc}") from exc
        if result.returncode != 0 and not may_fail:
            output = (result.stderr or result.stdout).strip()
            raise ServiceError(f"`{shlex.join(argv)}` failed (exit {result.returncode}): {output}")


def await_stopped(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = subprocess.run(("sc.exe", "query", name), capture_output=True, text=True)
        if result.returncode != 0 or windows_state(result.stdout) == "STOPPED":
            return
        time.sleep(1)
    raise ServiceError(f"{name} did not stop within {timeout_s:.0f} s")


def windows_service_exists() -> bool:
    return subprocess.run(("sc.exe", "query", SERVICE_NAME), capture_output=True).returncode == 0


def is_admin() -> bool:
    if sys.platform == "win32":
        import ctypes

        return bool(ctypes.windll.shell32.IsUserAnAdmin())
    return os.geteuid() == 0
