"""`hatchway-agent service install|uninstall|status|host`: the click commands, thin over the library modules."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from agent.service.executor import Executor, is_admin, owner_ids, windows_service_exists
from agent.service.plans import install_plan, uninstall_plan
from agent.service.spec import (
    DEFAULT_USERS,
    EXIT_CREDENTIAL_REFUSED,
    SERVICE_NAME,
    SYSTEMS,
    ServiceSpec,
    agent_command,
    system_config_path,
    this_system,
)
from agent.service.status import current_status
from agent.service.stop import STOP_SWITCH


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
@click.pass_context
def host_command(ctx: click.Context, config: str, run_args: tuple[str, ...]) -> None:
    """Windows only: what the Service Control Manager starts. Speaks its protocol and runs the agent."""
    from agent.service import windows

    if this_system() != "windows":
        raise click.ClickException("`service host` is what the Windows Service Control Manager runs; use `run`")
    # The program this command is part of (`hatchway-agent`), whose `run` the service runs: found through click,
    # so that the commands never import the CLI that imports them.
    program = ctx.find_root().command

    def run() -> int:
        code = _run_agent(program, ["run", "--config", config, *run_args])
        if code == EXIT_CREDENTIAL_REFUSED:
            # Reported as a clean stop, so that the SCM's failure actions do not restart a revoked node forever.
            windows.log.error("the plane refused this node's credential: enroll again, then start")
            return 0
        return code

    sys.exit(windows.host(run, STOP_SWITCH.press, log_dir=Path(config).parent / "logs"))


def _run_agent(program: click.Command, args: list[str]) -> int:
    """`hatchway-agent run ...` in this process, its exit code as a number."""
    try:
        program.main(args=args, prog_name="hatchway-agent", standalone_mode=False)
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
