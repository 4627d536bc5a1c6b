"""Installing and removing a service as a `Plan`: a list of steps (write a file, change an owner, run a command)
built by pure functions, so that `--dry-run` prints exactly what would be done, for any of the three systems, on
any of them. agent.service.executor carries a plan out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from agent.service.spec import (
    LAUNCHD_LABEL,
    MACOS_LOG_DIR,
    PLIST_PATH,
    SERVICE_NAME,
    STOP_TIMEOUT_S,
    UNIT_PATH,
    WINDOWS_ACCOUNT,
    ServiceSpec,
)
from agent.service.units import launchd_plist, systemd_unit, windows_command_line


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: str
    mode: int


@dataclass(frozen=True)
class RemoveFile:
    path: str


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: int
    owner: str = ""


@dataclass(frozen=True)
class Chown:
    """Give a file to the service's user, when it exists: the config holds the credential and is 0600."""

    path: str
    owner: str


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    # A command whose failure is expected and harmless, e.g. stopping a service that is not running.
    may_fail: bool = False


@dataclass(frozen=True)
class AwaitStopped:
    """Windows: `sc.exe stop` only asks; wait until the service has drained and stopped."""

    name: str
    timeout_s: float = STOP_TIMEOUT_S + 10


Step = WriteFile | RemoveFile | MakeDir | Chown | Command | AwaitStopped


@dataclass
class Plan:
    system: str
    steps: list[Step] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(describe(step, self.system) for step in self.steps)


def describe(step: Step, system: str) -> str:
    match step:
        case WriteFile(path, content, mode):
            return f"# write {path} (mode {mode:04o})\n{content.rstrip()}\n# end of {path}"
        case RemoveFile(path):
            return f"# remove {path}"
        case MakeDir(path, mode, owner):
            return f"# make directory {path} (mode {mode:04o}{', owner ' + owner if owner else ''})"
        case Chown(path, owner):
            return f"# give {path} to {owner} (if it exists)"
        case Command(argv, may_fail):
            line = windows_command_line(argv) if system == "windows" else shlex.join(argv)
            return f"{line}{'  # may fail' if may_fail else ''}"
        case AwaitStopped(name, timeout_s):
            return f"# wait up to {timeout_s:.0f} s for {name} to stop"
    raise AssertionError(step)


def install_plan(spec: ServiceSpec, *, start: bool = True, installed: bool = False, root: Path | None = None) -> Plan:
    """`installed`: Windows only, whether the service exists already (then it is reconfigured, not created).
    `root`: Linux only, an image or a throw-away root to write into: enabled there for boot, nothing started."""
    if spec.system == "linux":
        return _linux_install(spec, start=start, root=root)
    if spec.system == "macos":
        return _macos_install(spec, start=start)
    return _windows_install(spec, start=start, installed=installed)


def uninstall_plan(system: str, *, root: Path | None = None) -> Plan:
    if system == "linux":
        unit = f"{SERVICE_NAME}.service"
        if root is not None:
            disable = Command(("systemctl", "--root", str(root), "disable", unit), may_fail=True)
            return Plan(system, [disable, RemoveFile(UNIT_PATH)])
        return Plan(
            system,
            [
                Command(("systemctl", "disable", "--now", unit), may_fail=True),
                RemoveFile(UNIT_PATH),
                Command(("systemctl", "daemon-reload")),
            ],
        )
    if system == "macos":
        bootout = Command(("launchctl", "bootout", f"system/{LAUNCHD_LABEL}"), may_fail=True)
        return Plan(system, [bootout, RemoveFile(PLIST_PATH)])
    return Plan(
        system,
        [
            Command(("sc.exe", "stop", SERVICE_NAME), may_fail=True),
            AwaitStopped(SERVICE_NAME),
            Command(("sc.exe", "delete", SERVICE_NAME)),
        ],
    )


def _linux_install(spec: ServiceSpec, *, start: bool, root: Path | None) -> Plan:
    unit = f"{SERVICE_NAME}.service"
    steps: list[Step] = [WriteFile(UNIT_PATH, systemd_unit(spec), 0o644)]
    if spec.user:
        steps.append(Chown(spec.config, spec.user))
    if root is not None:
        # systemctl --root works on the files alone: the unit is enabled for the next boot of that system.
        steps.append(Command(("systemctl", "--root", str(root), "enable", unit)))
        return Plan("linux", steps)
    steps += [Command(("systemctl", "daemon-reload")), Command(("systemctl", "enable", unit))]
    if start:
        # restart, not start: a second install (a new build, new options) must take effect now.
        steps.append(Command(("systemctl", "restart", unit)))
    return Plan("linux", steps)


def _macos_install(spec: ServiceSpec, *, start: bool) -> Plan:
    target = f"system/{LAUNCHD_LABEL}"
    steps: list[Step] = [
        MakeDir(MACOS_LOG_DIR, 0o755, spec.user),
        WriteFile(PLIST_PATH, launchd_plist(spec), 0o644),
    ]
    if spec.user:
        steps.append(Chown(spec.config, spec.user))
    # Unload a previous version first: bootstrap refuses a label that is already loaded.
    steps += [Command(("launchctl", "bootout", target), may_fail=True), Command(("launchctl", "enable", target))]
    if start:
        steps.append(Command(("launchctl", "bootstrap", "system", PLIST_PATH)))
    return Plan("macos", steps)


RESTART_ACTIONS = "restart/5000/restart/30000/restart/60000"
DATA_DIR_GRANTS = ("*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F", f"{WINDOWS_ACCOUNT}:(OI)(CI)M")


def _windows_install(spec: ServiceSpec, *, start: bool, installed: bool) -> Plan:
    data_dir = str(PureWindowsPath(spec.config).parent)
    settings = (
        "binPath=", windows_command_line(spec.host_argv),
        # Delayed: the network is usually up by then, and boot is not slowed by loading a model.
        "start=", "delayed-auto",
        "obj=", WINDOWS_ACCOUNT,
        "DisplayName=", "Hatchway agent",
    )  # fmt: skip
    steps: list[Step] = []
    if installed:
        steps += [
            Command(("sc.exe", "stop", SERVICE_NAME), may_fail=True),
            AwaitStopped(SERVICE_NAME),
            Command(("sc.exe", "config", SERVICE_NAME, *settings)),
        ]
    else:
        steps.append(Command(("sc.exe", "create", SERVICE_NAME, *settings)))
    steps += [
        Command(("sc.exe", "description", SERVICE_NAME, "Serves GGUF models to a Hatchway plane from this machine.")),
        # Restart after 5 s, 30 s, then every 60 s; a clean exit (including a revoked credential) is no failure.
        Command(("sc.exe", "failure", SERVICE_NAME, "reset=", "86400", "actions=", RESTART_ACTIONS)),
        # Count a stop with a non-zero exit code as a failure too, not only a crash.
        Command(("sc.exe", "failureflag", SERVICE_NAME, "1")),
        Command(("sc.exe", "sidtype", SERVICE_NAME, "unrestricted")),
        # The config holds the node credential: SYSTEM, Administrators and the service's own account only.
        # Well-known SIDs rather than names, which are translated on non-English Windows.
        Command(("icacls", data_dir, "/inheritance:r", "/grant:r", *DATA_DIR_GRANTS)),
    ]
    if start:
        steps.append(Command(("sc.exe", "start", SERVICE_NAME)))
    return Plan("windows", steps)
