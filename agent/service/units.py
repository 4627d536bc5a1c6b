"""What each service manager is given, rendered from a `ServiceSpec`: a systemd unit, a launchd plist, a Windows
command line. Pure functions: the same text on any system.
"""

from __future__ import annotations

import plistlib
import re
import subprocess
from collections.abc import Sequence
from pathlib import PurePosixPath

from agent.service.spec import (
    EXIT_CREDENTIAL_REFUSED,
    LAUNCHD_LABEL,
    MACOS_LOG_DIR,
    SERVICE_NAME,
    STOP_TIMEOUT_S,
    ServiceSpec,
)


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
