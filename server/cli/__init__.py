"""`hatchway`: run the plane (`serve`) and administer it (`admin ...`). Thin: parse, then call the code."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from server import __version__
from server.config import Config, ConfigError

# A distinct exit code when the plane cannot start (bad config, port in use), as uvicorn does.
STARTUP_FAILURE = 3


class Commands(click.Group):
    """The top-level commands, with `admin` loaded only when asked for: `hatchway serve` runs the plane in this
    process, and the admin commands and their HTTP client (httpx) would stay in its memory for nothing."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "admin"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "admin":
            from server.cli.admin import admin

            return admin
        return super().get_command(ctx, cmd_name)


@click.group(cls=Commands)
@click.version_option(__version__, prog_name="hatchway")
def cli() -> None:
    """Hatchway: an OpenAI-compatible gateway over providers and your own machines."""


@cli.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="HTTP port (default 8080; 0 picks a free one).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="State directory.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="TOML file: [server] settings plus declared orgs and providers.",
)
@click.option("--grpc-port", type=int, default=None, help="Node service port (default 8443; 0 picks one).")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--database-url", default=None, help="Database shared by several planes (postgresql+psycopg://...).")
@click.option("--redis-url", default=None, help="Redis for limits shared by several planes (redis://host:6379/0).")
@click.option("--nats-url", default=None, help="NATS carrying node jobs between planes (nats://host:4222).")
@click.option("--workers", default=None, help="Plane processes sharing the ports (a number, or auto: one per core).")
def serve(
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    config_file: Path | None,
    grpc_port: int | None,
    log_level: str | None,
    database_url: str | None,
    redis_url: str | None,
    nats_url: str | None,
    workers: str | None,
) -> None:
    """Run the control plane."""
    from server.serving.serve import run

    try:
        config = Config.load(
            overrides={
                "host": host,
                "port": port,
                "grpc_port": grpc_port,
                "data_dir": data_dir,
                "log_level": log_level,
                "database_url": database_url,
                "redis_url": redis_url,
                "nats_url": nats_url,
                "workers": workers,
            },
            config_file=config_file,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(config)
    except (ConfigError, OSError) as exc:
        click.echo(f"Error: cannot start: {exc}", err=True)
        raise SystemExit(STARTUP_FAILURE) from exc


@cli.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="HTTP port (default 8080).")
@click.option("--grpc-port", type=int, default=None, help="Node service port (default 8443).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="State directory.")
def demo(host: str | None, port: int | None, grpc_port: int | None, data_dir: Path | None) -> None:
    """Run the plane with a local agent serving the bundled demo model (what `make run` does)."""
    import asyncio

    from server.cli.demo import run_demo

    try:
        config = Config.load(overrides={"host": host, "port": port, "grpc_port": grpc_port, "data_dir": data_dir})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_demo(config))


def main() -> None:
    cli()
