"""`hatchway-agent service install|uninstall|status`: the agent as a service of the OS it runs on.

One place renders what each service manager is given, for this command and for the installers in `installers/`
alike (they call it rather than carry their own copies):

    Linux    a systemd unit, /etc/systemd/system/hatchway-agent.service (sandboxed, journald for logs)
    macOS    a launchd daemon, /Library/LaunchDaemons/com.hatchway.agent.plist (logs in /Library/Logs/Hatchway)
    Windows  a service of the Service Control Manager, registered with sc.exe, running as the virtual account
             NT SERVICE\\hatchway-agent (logs in %ProgramData%\\Hatchway\\logs and the Application event log)

Each runs `hatchway-agent run --config CONFIG [RUN OPTIONS]`, starts at boot and restarts after a failure, but
not after exit code 2 (the plane refused the credential: restarting cannot help) where the manager can tell.

The package, library modules first (each imports only those above it), then the commands over them:

    spec        what to register (`ServiceSpec`), the names and places every manager is given, `ServiceError`
    units       the renderings: systemd unit, launchd plist, Windows command line (pure functions)
    plans       installing and removing as a `Plan` of steps built by pure functions, so `--dry-run` prints
                exactly what would be done, for any of the three systems, on any of them
    status      `service status`, parsed from what systemctl, launchctl and sc.exe print
    executor    carrying a plan out on this system (`Executor`)
    stop        `STOP_SWITCH`: stops `hatchway-agent run` from the Windows service control handler's thread
    windows     the Service Control Manager's side of `service host`, over ctypes (imported on Windows only)
    commands    the click group `service` that agent.cli adds; it reaches `run` through click's root command,
                never by importing agent.cli
"""

from __future__ import annotations

from agent.service.executor import Executor
from agent.service.plans import (
    AwaitStopped,
    Chown,
    Command,
    MakeDir,
    Plan,
    RemoveFile,
    Step,
    WriteFile,
    install_plan,
    uninstall_plan,
)
from agent.service.spec import PLIST_PATH, UNIT_PATH, ServiceError, ServiceSpec
from agent.service.status import ServiceStatus, launchd_status, systemd_status, windows_status
from agent.service.stop import STOP_SWITCH, StopSwitch
from agent.service.units import launchd_plist, systemd_quote, systemd_unit

__all__ = [
    "PLIST_PATH",
    "STOP_SWITCH",
    "UNIT_PATH",
    "AwaitStopped",
    "Chown",
    "Command",
    "Executor",
    "MakeDir",
    "Plan",
    "RemoveFile",
    "ServiceError",
    "ServiceSpec",
    "ServiceStatus",
    "Step",
    "StopSwitch",
    "WriteFile",
    "install_plan",
    "launchd_plist",
    "launchd_status",
    "systemd_quote",
    "systemd_status",
    "systemd_unit",
    "uninstall_plan",
    "windows_status",
]
