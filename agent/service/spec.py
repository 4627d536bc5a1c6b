"""What a service is: which system, which program, which config, as whom (`ServiceSpec`), and the names and places
every service manager is given.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import PureWindowsPath

import click

SERVICE_NAME = "hatchway-agent"
LAUNCHD_LABEL = "com.hatchway.agent"
SYSTEMS = ("linux", "macos", "windows")

UNIT_PATH = f"/etc/systemd/system/{SERVICE_NAME}.service"
PLIST_PATH = f"/Library/LaunchDaemons/{LAUNCHD_LABEL}.plist"
MACOS_LOG_DIR = "/Library/Logs/Hatchway"
DEFAULT_USERS = {"linux": "hatchway", "macos": "_hatchway"}
WINDOWS_ACCOUNT = f"NT SERVICE\\{SERVICE_NAME}"
# Seconds a draining agent gets to finish its running jobs when the service stops, before it is killed.
STOP_TIMEOUT_S = 120
# The agent's exit code when the plane refused its credential (agent/cli.py EXIT_CREDENTIAL_REFUSED).
EXIT_CREDENTIAL_REFUSED = 2


def this_system() -> str:
    if sys.platform == "win32":
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return "linux"


def system_config_path(system: str) -> str:
    """Where a service's config lives: a system-wide place, not the installing user's home."""
    if system == "windows":
        program_data = os.environ.get("PROGRAMDATA", r"C:\ProgramData") if this_system() == "windows" else ""
        return str(PureWindowsPath(program_data or r"C:\ProgramData", "Hatchway", "agent.json"))
    if system == "macos":
        return "/Library/Application Support/Hatchway/agent.json"
    return "/etc/hatchway/agent.json"


def agent_command() -> tuple[str, ...]:
    """How to start this very agent: the frozen executable itself, or this Python with `-m agent`."""
    if getattr(sys, "frozen", False):
        return (sys.executable,)
    return (sys.executable, "-m", "agent")


@dataclass(frozen=True)
class ServiceSpec:
    """What to register: on which system, which program, which config, as whom, with which run options."""

    system: str
    command: tuple[str, ...]
    config: str
    user: str = ""
    run_args: tuple[str, ...] = ()

    @property
    def run_argv(self) -> list[str]:
        return [*self.command, "run", "--config", self.config, *self.run_args]

    @property
    def host_argv(self) -> list[str]:
        """Windows: the SCM starts `service host`, which speaks the SCM's protocol and then runs the agent."""
        return [*self.command, "service", "host", "--config", self.config, *self.run_args]


class ServiceError(click.ClickException):
    """A step failed; the message names it."""
