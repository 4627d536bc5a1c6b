"""`hatchway-agent service`: what systemd, launchd and the Windows SCM are given, and the plans that give it."""

from __future__ import annotations

import asyncio
import plistlib
import shlex
import sys
import threading
from pathlib import Path

from click.testing import CliRunner

from agent.cli import cli
from agent.service import (
    PLIST_PATH,
    UNIT_PATH,
    AwaitStopped,
    Chown,
    Command,
    RemoveFile,
    ServiceSpec,
    StopSwitch,
    WriteFile,
    install_plan,
    launchd_plist,
    launchd_status,
    systemd_quote,
    systemd_status,
    systemd_unit,
    uninstall_plan,
    windows_status,
)

LINUX = ServiceSpec("linux", ("/opt/hatchway-agent/hatchway-agent",), "/etc/hatchway/agent.json", "hatchway")
MACOS = ServiceSpec(
    "macos",
    ("/usr/local/hatchway-agent/hatchway-agent",),
    "/Library/Application Support/Hatchway/agent.json",
    "_hatchway",
)
WINDOWS = ServiceSpec(
    "windows",
    (r"C:\Program Files\Hatchway\agent\hatchway-agent.exe",),
    r"C:\ProgramData\Hatchway\agent.json",
    run_args=("--model", r"C:\ProgramData\Hatchway\models\llama 3.gguf=llama", "--slots", "2"),
)


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def commands(steps: list[object]) -> list[tuple[str, ...]]:
    return [step.argv for step in steps if isinstance(step, Command)]


# -- systemd --------------------------------------------------------------------------------------------------


def test_systemd_unit_runs_the_agent_with_its_config_as_the_service_user() -> None:
    settings = unit_settings(systemd_unit(LINUX))
    assert settings["ExecStart"] == ["/opt/hatchway-agent/hatchway-agent run --config /etc/hatchway/agent.json"]
    assert settings["User"] == ["hatchway"]
    assert settings["WantedBy"] == ["multi-user.target"]
    assert settings["After"] == ["network-online.target"]


def test_systemd_unit_restarts_on_failure_but_not_after_a_refused_credential() -> None:
    settings = unit_settings(systemd_unit(LINUX))
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]
    assert settings["StartLimitIntervalSec"] == ["0"]


def test_systemd_unit_is_sandboxed_with_a_state_directory() -> None:
    settings = unit_settings(systemd_unit(LINUX))
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ProtectHome"] == ["read-only"]
    assert settings["PrivateTmp"] == ["yes"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["StateDirectory"] == ["hatchway-agent"]


def test_systemd_words_are_quoted_and_escaped_as_systemd_reads_them() -> None:
    assert systemd_quote("/opt/a") == "/opt/a"
    assert systemd_quote("/srv/my models/x.gguf=x") == '"/srv/my models/x.gguf=x"'
    assert systemd_quote("100%") == "100%%"
    assert systemd_quote("$HOME") == "$$HOME"
    assert systemd_quote('say "hi"') == '"say \\"hi\\""'
    assert systemd_quote(";") == '";"'


def test_systemd_unit_passes_run_options_through() -> None:
    spec = ServiceSpec(LINUX.system, LINUX.command, LINUX.config, LINUX.user, ("--model", "/m/a b.gguf=a"))
    (exec_start,) = unit_settings(systemd_unit(spec))["ExecStart"]
    assert shlex.split(exec_start)[-2:] == ["--model", "/m/a b.gguf=a"]


def test_linux_install_writes_the_unit_hands_over_the_config_then_enables_and_restarts() -> None:
    plan = install_plan(LINUX)
    assert plan.steps[0] == WriteFile(UNIT_PATH, systemd_unit(LINUX), 0o644)
    assert Chown("/etc/hatchway/agent.json", "hatchway") in plan.steps
    assert commands(plan.steps) == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "hatchway-agent.service"),
        ("systemctl", "restart", "hatchway-agent.service"),
    ]


def test_linux_install_into_a_root_only_enables_it_there_for_boot() -> None:
    plan = install_plan(LINUX, root=Path("/mnt/image"))
    assert commands(plan.steps) == [("systemctl", "--root", "/mnt/image", "enable", "hatchway-agent.service")]


def test_linux_uninstall_stops_disables_and_removes_the_unit() -> None:
    plan = uninstall_plan("linux")
    assert plan.steps == [
        Command(("systemctl", "disable", "--now", "hatchway-agent.service"), may_fail=True),
        RemoveFile(UNIT_PATH),
        Command(("systemctl", "daemon-reload")),
    ]


# -- launchd ----------------------------------------------------------------------------------------------------


def test_launchd_plist_parses_and_runs_the_installed_program_with_its_config() -> None:
    plist = plistlib.loads(launchd_plist(MACOS).encode())
    assert plist["Label"] == "com.hatchway.agent"
    assert plist["ProgramArguments"] == [
        "/usr/local/hatchway-agent/hatchway-agent",
        "run",
        "--config",
        "/Library/Application Support/Hatchway/agent.json",
    ]
    assert plist["UserName"] == "_hatchway"


def test_launchd_plist_starts_at_boot_restarts_after_failures_and_logs_to_library_logs() -> None:
    plist = plistlib.loads(launchd_plist(MACOS).encode())
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "/Library/Logs/Hatchway/agent.log"


def test_macos_install_replaces_a_loaded_daemon_then_bootstraps_it() -> None:
    plan = install_plan(MACOS)
    assert WriteFile(PLIST_PATH, launchd_plist(MACOS), 0o644) in plan.steps
    assert commands(plan.steps) == [
        ("launchctl", "bootout", "system/com.hatchway.agent"),
        ("launchctl", "enable", "system/com.hatchway.agent"),
        ("launchctl", "bootstrap", "system", PLIST_PATH),
    ]


# -- Windows ------------------------------------------------------------------------------------------------------


def test_windows_install_registers_the_service_host_as_a_virtual_account_with_delayed_start() -> None:
    create = commands(install_plan(WINDOWS).steps)[0]
    assert create == (
        "sc.exe", "create", "hatchway-agent",
        "binPath=", r'"C:\Program Files\Hatchway\agent\hatchway-agent.exe" service host --config '
                    r'C:\ProgramData\Hatchway\agent.json --model "C:\ProgramData\Hatchway\models\llama 3.gguf=llama" '
                    "--slots 2",
        "start=", "delayed-auto",
        "obj=", r"NT SERVICE\hatchway-agent",
        "DisplayName=", "Hatchway agent",
    )  # fmt: skip


def test_windows_install_restarts_on_failure_and_restricts_the_data_folder_to_the_service() -> None:
    argvs = commands(install_plan(WINDOWS).steps)
    assert ("sc.exe", "failure", "hatchway-agent", "reset=", "86400", "actions=",
            "restart/5000/restart/30000/restart/60000") in argvs  # fmt: skip
    assert ("sc.exe", "failureflag", "hatchway-agent", "1") in argvs
    grants = ("*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F", r"NT SERVICE\hatchway-agent:(OI)(CI)M")
    assert ("icacls", r"C:\ProgramData\Hatchway", "/inheritance:r", "/grant:r", *grants) in argvs
    assert argvs[-1] == ("sc.exe", "start", "hatchway-agent")


def test_windows_reinstall_stops_the_service_and_reconfigures_it_instead_of_creating_it() -> None:
    plan = install_plan(WINDOWS, installed=True)
    assert plan.steps[:2] == [
        Command(("sc.exe", "stop", "hatchway-agent"), may_fail=True),
        AwaitStopped("hatchway-agent"),
    ]
    assert commands(plan.steps)[1][:3] == ("sc.exe", "config", "hatchway-agent")
    assert not [argv for argv in commands(plan.steps) if argv[1] == "create"]


def test_windows_uninstall_waits_for_the_drain_before_deleting() -> None:
    assert uninstall_plan("windows").steps == [
        Command(("sc.exe", "stop", "hatchway-agent"), may_fail=True),
        AwaitStopped("hatchway-agent"),
        Command(("sc.exe", "delete", "hatchway-agent")),
    ]


# -- status ------------------------------------------------------------------------------------------------------


def test_status_reads_systemd() -> None:
    running = systemd_status("LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=4242\n")
    assert (running.exit_code, running.detail) == (0, "active (running), pid 4242")
    failed = systemd_status("LoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\n")
    assert (failed.exit_code, failed.detail) == (3, "failed (failed)")
    assert systemd_status("LoadState=not-found\nActiveState=inactive\n").exit_code == 4


def test_status_reads_launchd() -> None:
    output = "system/com.hatchway.agent = {\n\tactive count = 1\n\tstate = running\n\tpid = 812\n}\n"
    assert launchd_status(0, output).exit_code == 0
    assert launchd_status(0, output.replace("running", "not running")).exit_code == 3
    assert launchd_status(113, "Could not find service").exit_code == 4


def test_status_reads_the_service_control_manager() -> None:
    output = "SERVICE_NAME: hatchway-agent\n        TYPE               : 10  WIN32_OWN_PROCESS\n" \
             "        STATE              : 4  RUNNING\n"  # fmt: skip
    assert windows_status(0, output).exit_code == 0
    assert windows_status(0, output.replace("4  RUNNING", "1  STOPPED")).exit_code == 3
    assert windows_status(1060, "The specified service does not exist").exit_code == 4


# -- the Windows service's stop ------------------------------------------------------------------------------------


async def test_stop_switch_stops_the_agent_loop_from_another_thread() -> None:
    switch, stop = StopSwitch(), asyncio.Event()
    switch.attach(asyncio.get_running_loop(), stop)
    threading.Thread(target=switch.press).start()
    await asyncio.wait_for(stop.wait(), 10)


async def test_stop_switch_pressed_before_the_agent_started_stops_it_at_once() -> None:
    switch, stop = StopSwitch(), asyncio.Event()
    switch.press()
    switch.attach(asyncio.get_running_loop(), stop)
    assert stop.is_set()


# -- the command ----------------------------------------------------------------------------------------------------


def test_dry_run_prints_another_systems_plan_and_changes_nothing() -> None:
    result = CliRunner().invoke(
        cli, ["service", "install", "--dry-run", "--os", "windows", "--exec", r"C:\hw\hatchway-agent.exe"]
    )
    assert result.exit_code == 0, result.output
    assert "sc.exe create hatchway-agent binPath=" in result.output
    assert "sc.exe start hatchway-agent" in result.output


def test_run_options_after_a_double_dash_reach_the_service_command_line() -> None:
    args = ["service", "install", "--dry-run", "--os", "linux", "--exec", "/opt/a", "--", "--slots", "2"]
    result = CliRunner().invoke(cli, args)
    assert "ExecStart=/opt/a run --config /etc/hatchway/agent.json --slots 2" in result.output


def test_installing_for_another_system_without_dry_run_is_a_usage_error() -> None:
    other = "linux" if sys.platform == "win32" else "windows"
    result = CliRunner().invoke(cli, ["service", "install", "--os", other])
    assert result.exit_code == 2
    assert "--dry-run" in result.output


def test_install_into_a_root_writes_an_enabled_unit_and_hands_the_config_to_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc" / "hatchway").mkdir(parents=True)
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nhatchway:x:990:991::/nonexistent:/bin/false\n")
    config = tmp_path / "etc" / "hatchway" / "agent.json"
    config.write_text("{}")
    config.chmod(0o600)
    args = ["service", "install", "--root", str(tmp_path), "--exec", "/opt/hatchway-agent/hatchway-agent"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    unit = tmp_path / "etc" / "systemd" / "system" / "hatchway-agent.service"
    assert unit.stat().st_mode & 0o777 == 0o644
    wanted = tmp_path / "etc" / "systemd" / "system" / "multi-user.target.wants" / "hatchway-agent.service"
    assert wanted.is_symlink()
    assert (config.stat().st_uid, config.stat().st_gid) == (990, 991)
