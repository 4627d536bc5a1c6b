"""`hatchway-agent service install|uninstall|status`: the agent as a service of the OS it runs on.

One place renders what each service manager is given, for this command and for the installers in `installers/`
alike (they call it rather than carry their own copies):

    Linux    a systemd unit, /etc/systemd/system/hatchway-agent.service (sandboxed, journald for logs)
    macOS    a launchd daemon, /Library/LaunchDaemons/com.hatchway.agent.plist (logs in /Library/Logs/Hatchway)
    Windows  a service of the Service Control Manager, registered with sc.exe, running as the virtual account
             NT SERVICE\\hatchway-agent (logs in %ProgramData%\\Hatchway\\logs and the Application event log)

Each runs `hatchway-agent run --config CONFIG [RUN OPTIONS]`, starts at boot and restarts after a failure, but
not after exit code 2 (the plane refused the credential: restarting cannot help) where the manager can tell.

Installing is a `Plan`: a list of steps (write a file, change an owner, run a command) built by pure functions,
so `--dry-run` prints exactly what would be done, for any of the three systems, on any of them.
"""

from __future__ import annotations

import asyncio
import os
import plistlib
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

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

# `service status` exit codes, as LSB init scripts and `systemctl status` use them.
STATUS_RUNNING = 0
STATUS_STOPPED = 3
STATUS_NOT_INSTALLED = 4


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


# -- renderings -------------------------------------------------------------------------------------------


def systemd_quote(arg: str) -> str:
    """One ExecStart word: `%` and `$` doubled (systemd expands them), quoted when it holds anything else that
    systemd would split on or interpret."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


SYSTEMD_UNIT = """\
[Unit]
Description=Hatchway node agent
# The agent dials out to the plane: start once the network is up. It reconnects by itself after that.
Wants=network-online.target
After=network-online.target
# Never stop restarting: a node must come back by itself, e.g. once a late-mounted model disk appears.
StartLimitIntervalSec=0

[Service]
Type=exec
{user_line}ExecStart={exec_start}
Restart=on-failure
RestartSec=5
# Exit code 2: the plane refused this node's credential (revoked); restarting cannot help.
RestartPreventExitStatus={credential_refused}
# SIGTERM drains: running jobs finish and no new ones arrive; give them time before SIGKILL.
TimeoutStopSec={stop_timeout}
StateDirectory={name}
StateDirectoryMode=0750
WorkingDirectory=%S/{name}
Environment=HOME=%S/{name}
UMask=0077
# Sandboxing: the agent needs the network, its config and models (read-only), and its state directory.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
CapabilityBoundingSet=
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
# Deliberately absent: PrivateDevices= and DevicePolicy= (GPUs are device nodes the agent must open:
# /dev/nvidia*, /dev/dri), and MemoryDenyWriteExecute= (ctypes callbacks into llama.cpp need W+X memory).

[Install]
WantedBy=multi-user.target
"""


def systemd_unit(spec: ServiceSpec) -> str:
    return SYSTEMD_UNIT.format(
        user_line=f"User={spec.user}\n" if spec.user else "",
        exec_start=" ".join(systemd_quote(arg) for arg in spec.run_argv),
        credential_refused=EXIT_CREDENTIAL_REFUSED,
        stop_timeout=STOP_TIMEOUT_S,
        name=SERVICE_NAME,
    )


def launchd_plist(spec: ServiceSpec) -> str:
    state_dir = str(PurePosixPath(spec.config).parent)
    doc: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": spec.run_argv,
        "RunAtLoad": True,
        # Restart after a crash or a non-zero exit, not after a clean stop. launchd cannot single out exit code 2.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": STOP_TIMEOUT_S,
        "WorkingDirectory": state_dir,
        "EnvironmentVariables": {"HOME": state_dir},
        "StandardOutPath": f"{MACOS_LOG_DIR}/agent.log",
        "StandardErrorPath": f"{MACOS_LOG_DIR}/agent.log",
        "Umask": 0o077,
    }
    if spec.user:
        doc["UserName"] = spec.user
    return plistlib.dumps(doc).decode()


def windows_command_line(argv: Sequence[str]) -> str:
    return subprocess.list2cmdline(list(argv))


# -- plans ---------------------------------------------------------------------------------------------------


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


# -- carrying a plan out ------------------------------------------------------------------------------------


class ServiceError(click.ClickException):
    """A step failed; the message names it."""


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


# -- status --------------------------------------------------------------------------------------------------


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


# -- stopping `run` from another thread -----------------------------------------------------------------------


class StopSwitch:
    """Lets another thread stop `hatchway-agent run` as SIGTERM would: the Windows service control handler runs
    on the SCM dispatcher's thread, where no signal reaches the agent's event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop: Callable[[], None] | None = None
        self._pressed = False

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        def stop() -> None:
            loop.call_soon_threadsafe(event.set)

        with self._lock:
            self._stop = stop
            pressed = self._pressed
        if pressed:
            event.set()

    def press(self) -> None:
        with self._lock:
            self._pressed = True
            stop = self._stop
        if stop is not None:
            stop()


STOP_SWITCH = StopSwitch()


# -- the commands ----------------------------------------------------------------------------------------------


@click.group("service")
def service() -> None:
    """Run this agent as a service of the OS: systemd, launchd or the Windows Service Control Manager."""


@service.command("install", context_settings={"ignore_unknown_options": True})
@click.option("--config", "config", default=None, help="Config file the service runs with (default: per OS).")
@click.option("--user", default=None, help="Account the service runs as (Linux: hatchway, macOS: _hatchway).")
@click.option("--exec", "executable", default=None, help="The agent executable (default: this one).")
@click.option("--no-start", is_flag=True, help="Register and enable for boot, but do not start now.")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Linux: write into this root (an image, a chroot) and enable there; start nothing.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--os", "system", type=click.Choice(SYSTEMS), default=None, help="With --dry-run: plan for this OS.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def install_command(
    config: str | None,
    user: str | None,
    executable: str | None,
    no_start: bool,
    root: Path | None,
    dry_run: bool,
    system: str | None,
    run_args: tuple[str, ...],
) -> None:
    """Register `hatchway-agent run` as a service: started at boot, restarted on failure.

    Options after `--` go to `run`, e.g. `service install -- --model /models/x.gguf=x --slots 2`.
    """
    system = _target_system(system, dry_run, root)
    root = root.resolve() if root else None
    if system == "windows":
        user = ""
    elif user is None:
        user = DEFAULT_USERS[system]
    spec = ServiceSpec(
        system=system,
        command=(executable,) if executable else agent_command(),
        config=config or os.environ.get("HATCHWAY_AGENT_CONFIG") or system_config_path(system),
        user=user,
        run_args=run_args,
    )
    installed = not dry_run and system == "windows" and windows_service_exists()
    plan = install_plan(spec, start=not no_start, installed=installed, root=root)
    if dry_run:
        click.echo(plan.describe())
        return
    target_root = root or Path("/")
    if user:
        owner_ids(user, target_root)  # refuse before changing anything
    Executor(target_root).apply(plan)
    where = f" in {root}" if root else ""
    click.echo(f"Installed the {SERVICE_NAME} service{where}, running: {shlex.join(spec.run_argv)}")


@service.command("uninstall")
@click.option(
    "--root", type=click.Path(path_type=Path, file_okay=False), default=None, help="Linux: remove from this root."
)
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--os", "system", type=click.Choice(SYSTEMS), default=None, help="With --dry-run: plan for this OS.")
def uninstall_command(root: Path | None, dry_run: bool, system: str | None) -> None:
    """Stop the service and remove its registration (the config and the agent's files stay)."""
    system = _target_system(system, dry_run, root)
    root = root.resolve() if root else None
    if system == "windows" and not dry_run and not windows_service_exists():
        click.echo(f"No {SERVICE_NAME} service to remove.")
        return
    plan = uninstall_plan(system, root=root)
    if dry_run:
        click.echo(plan.describe())
        return
    Executor(root or Path("/")).apply(plan)
    click.echo(f"Removed the {SERVICE_NAME} service.")


@service.command("status")
def status_command() -> None:
    """Whether the service is installed and running. Exit code 0: running, 3: stopped, 4: not installed."""
    status = current_status(this_system())
    click.echo(f"{SERVICE_NAME}: {status.detail}")
    sys.exit(status.exit_code)


@service.command("host", hidden=True, context_settings={"ignore_unknown_options": True})
@click.option("--config", "config", required=True)
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def host_command(config: str, run_args: tuple[str, ...]) -> None:
    """Windows only: what the Service Control Manager starts. Speaks its protocol and runs the agent."""
    from agent import service_windows

    if this_system() != "windows":
        raise click.ClickException("`service host` is what the Windows Service Control Manager runs; use `run`")

    def run() -> int:
        code = _run_agent(["run", "--config", config, *run_args])
        if code == EXIT_CREDENTIAL_REFUSED:
            # Reported as a clean stop, so that the SCM's failure actions do not restart a revoked node forever.
            service_windows.log.error("the plane refused this node's credential: enroll again, then start")
            return 0
        return code

    sys.exit(service_windows.host(run, STOP_SWITCH.press, log_dir=Path(config).parent / "logs"))


def _run_agent(args: list[str]) -> int:
    """`hatchway-agent run ...` in this process, its exit code as a number."""
    from agent.cli import cli

    try:
        cli.main(args=args, prog_name="hatchway-agent", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    return 0


def _target_system(system: str | None, dry_run: bool, root: Path | None) -> str:
    here = this_system()
    if system is not None and system != here and not dry_run:
        raise click.UsageError(f"--os {system} plans for another system: add --dry-run")
    system = system or here
    if root is not None and system != "linux":
        raise click.UsageError("--root is for Linux images and chroots")
    if not dry_run and not is_admin():
        who = "an Administrator PowerShell" if here == "windows" else "root (sudo)"
        raise click.ClickException(f"installing or removing a service needs {who}; --dry-run shows the plan")
    return system
