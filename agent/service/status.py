"""Whether the service is installed and running (`ServiceStatus`), read from what each service manager prints."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from agent.service.spec import LAUNCHD_LABEL, SERVICE_NAME, ServiceError

# `service status` exit codes, as LSB init scripts and `systemctl status` use them.
STATUS_RUNNING = 0
STATUS_STOPPED = 3
STATUS_NOT_INSTALLED = 4


@dataclass(frozen=True)
class ServiceStatus:
    installed: bool
    running: bool
    detail: str

    @property
    def exit_code(self) -> int:
        if not self.installed:
            return STATUS_NOT_INSTALLED
        return STATUS_RUNNING if self.running else STATUS_STOPPED


def systemd_status(show_output: str) -> ServiceStatus:
    """From `systemctl show UNIT --property=LoadState,ActiveState,SubState,MainPID`."""
    props = dict(line.partition("=")[::2] for line in show_output.splitlines() if "=" in line)
    if props.get("LoadState", "not-found") == "not-found":
        return ServiceStatus(False, False, "not installed")
    detail = f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})"
    if props.get("MainPID", "0") != "0":
        detail += f", pid {props['MainPID']}"
    return ServiceStatus(True, props.get("ActiveState") == "active", detail)


def launchd_status(returncode: int, print_output: str) -> ServiceStatus:
    """From `launchctl print system/LABEL` (exit code 113 when no such service is loaded)."""
    if returncode != 0:
        return ServiceStatus(False, False, "not installed")
    state = re.search(r"^\s*state = (\S+)", print_output, re.MULTILINE)
    pid = re.search(r"^\s*pid = (\d+)", print_output, re.MULTILINE)
    detail = state.group(1) if state else "unknown"
    if pid:
        detail += f", pid {pid.group(1)}"
    return ServiceStatus(True, bool(state and state.group(1) == "running"), detail)


def windows_state(query_output: str) -> str:
    match = re.search(r"STATE\s*:\s*\d+\s+(\w+)", query_output)
    return match.group(1) if match else "UNKNOWN"


def windows_status(returncode: int, query_output: str) -> ServiceStatus:
    """From `sc.exe query NAME` (exit code 1060 when no such service exists)."""
    if returncode != 0:
        return ServiceStatus(False, False, "not installed")
    state = windows_state(query_output)
    return ServiceStatus(True, state == "RUNNING", state.lower())


def current_status(system: str) -> ServiceStatus:
    if system == "linux":
        props = "--property=LoadState,ActiveState,SubState,MainPID"
        result = subprocess.run(("systemctl", "show", f"{SERVICE_NAME}.service", props), capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"systemctl failed: {result.stderr.strip()}")
        return systemd_status(result.stdout)
    if system == "macos":
        result = subprocess.run(("launchctl", "print", f"system/{LAUNCHD_LABEL}"), capture_output=True, text=True)
        return launchd_status(result.returncode, result.stdout)
    result = subprocess.run(("sc.exe", "query", SERVICE_NAME), capture_output=True, text=True)
    return windows_status(result.returncode, result.stdout)
