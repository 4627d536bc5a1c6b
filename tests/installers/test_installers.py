"""installers/: the Linux installer run for real into a throw-away root, the macOS one as a dry run, and the best
static checks this machine has for the rest (shellcheck, a PowerShell parser, hadolint, actionlint).

What needs another OS, a live service manager or a Docker engine runs in .github/workflows/installers.yml.
"""

from __future__ import annotations

import hashlib
import json
import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tree_sitter_powershell
import yaml
from tree_sitter import Language, Node, Parser

from agent.cli import demo_model_path
from server.cli.client import AdminClient
from tests.conftest import REPO
from tests.support.agent_build import agent_build
from tests.support.agent_process import DEMO_MODEL
from tests.support.plane_process import PlaneProcess

# The first test of a session may wait for the PyInstaller build.
pytestmark = pytest.mark.timeout(600)

INSTALLERS = REPO / "installers"
LINUX_INSTALL = INSTALLERS / "linux" / "install.sh"
LINUX_UNINSTALL = INSTALLERS / "linux" / "uninstall.sh"
MACOS_INSTALL = INSTALLERS / "macos" / "install.sh"
POWERSHELL_SCRIPTS = sorted((INSTALLERS / "windows").glob("*.ps1"))
DOCKERFILES = sorted((INSTALLERS / "docker").glob("*.Dockerfile"))
WORKFLOW = REPO / ".github" / "workflows" / "installers.yml"
TOOLS = Path(sys.executable).parent  # shellcheck, hadolint, actionlint: installed by the dev extra
ADMIN_KEY = "hwa-installer-tests"
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# -- a plane, a throw-away root, the installer ------------------------------------------------------------------


@dataclass
class Plane:
    process: PlaneProcess
    admin: AdminClient
    node_address: str

    def token(self) -> str:
        return str(self.admin.post("/node-tokens", {"org": "acme"})["token"])

    def node(self, node_id: str) -> dict[str, Any]:
        return self.admin.get(f"/nodes/{node_id}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def build() -> Path:
    return agent_build()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    process = PlaneProcess(tmp_path_factory.mktemp("plane"), env={"HATCHWAY_ADMIN_KEY": ADMIN_KEY})
    port = process.wait_for(re.compile(r"Node service listening on \S+:(\d+)")).group(1)
    admin = AdminClient(process.url, ADMIN_KEY)
    admin.post("/orgs", {"name": "acme"})
    yield Plane(process, admin, f"127.0.0.1:{port}")
    admin.close()
    process.terminate()


def make_root(root: Path) -> Path:
    """A Linux system's bones: this machine's user database, systemd units and configuration, and the usual
    directories."""
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        shutil.copy2(Path("/etc") / name, root / "etc" / name)
        if name != "login.defs":
            # shadow-utils keeps a backup beside each file; a real system has them already.
            shutil.copy2(Path("/etc") / name, root / "etc" / f"{name}-")
    for folder in ("opt", "usr/local/bin", "usr/sbin", "var/lib"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copytree("/etc/systemd/system", root / "etc" / "systemd" / "system", symlinks=True)
    shutil.copy2("/usr/sbin/nologin", root / "usr" / "sbin" / "nologin")
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return root


@pytest.fixture
def target_root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copy(demo_model_path(), tmp_path_factory.mktemp("models") / "smollm2.gguf"))


def install(
    root: Path, source: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["sh", str(LINUX_INSTALL), "--root", str(root), "--from", str(source), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def uninstall(root: Path) -> subprocess.CompletedProcess[str]:
    argv = ["sh", str(LINUX_UNINSTALL), "--root", str(root)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


@dataclass
class Installed:
    root: Path
    plane: Plane
    output: str

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.path("/etc/hatchway/agent.json").read_text())  # type: ignore[no-any-return]

    def user(self, name: str = "hatchway") -> list[str]:
        lines = [line for line in self.path("/etc/passwd").read_text().splitlines() if line.startswith(f"{name}:")]
        assert len(lines) == 1, lines
        return lines[0].split(":")


@pytest.fixture(scope="module")
def installed(build: Path, plane: Plane, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """One installation, read by the tests below that only look at it."""
    root = make_root(tmp_path_factory.mktemp("installed") / "root")
    result = ok(
        install(
            root, build, "--plane", plane.node_address, "--token", plane.token(), "--name", "lab-box",
            "--model", f"{model}={DEMO_MODEL}", "--", "--slots", "2",
        )
    )  # fmt: skip
    return Installed(root, plane, result.stdout)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under `root` with its mode, owner, group and content (files) or target (links).

    shadow-utils' backups (etc/passwd- ...) are left out: any change to the user database rewrites them."""
    found: dict[str, tuple[int, int, int, str]] = {}
    for path in [root, *root.rglob("*")]:
        relative = str(path.relative_to(root))
        if re.fullmatch(r"etc/\w+-", relative):
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            what = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        found[relative] = (info.st_mode, info.st_uid, info.st_gid, what)
    return found


# -- Linux: what the installer puts where --------------------------------------------------------------------------


def test_linux_installer_puts_the_build_under_opt_owned_by_root_and_writable_by_no_one_else(
    installed: Installed,
) -> None:
    prefix = installed.path("/opt/hatchway-agent")
    for path in [prefix, *prefix.rglob("*")]:
        info = path.lstat()
        assert info.st_uid == 0 and info.st_gid == 0, path
        # A symbolic link's own mode means nothing; what it points to is checked in its own right.
        assert stat.S_ISLNK(info.st_mode) or not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    assert (prefix / "hatchway-agent").stat().st_mode & 0o777 == 0o755
    assert os.readlink(installed.path("/usr/local/bin/hatchway-agent")) == "/opt/hatchway-agent/hatchway-agent"


def test_linux_installer_creates_a_system_user_that_cannot_log_in(installed: Installed) -> None:
    _, _, uid, gid, _, home, shell = installed.user()
    assert int(uid) < 1000  # SYS_UID_MAX: a system account
    assert (home, shell) == ("/var/lib/hatchway-agent", "/usr/sbin/nologin")
    groups = installed.path("/etc/group").read_text().splitlines()
    assert next(g for g in groups if g.split(":")[0] == "hatchway").split(":")[2] == gid


def test_linux_installer_enrolls_and_keeps_the_credential_readable_by_the_service_alone(installed: Installed) -> None:
    _, _, uid, gid, *_ = installed.user()
    config_dir = installed.path("/etc/hatchway").stat()
    assert (config_dir.st_mode & 0o777, config_dir.st_uid, config_dir.st_gid) == (0o750, 0, int(gid))
    config = installed.path("/etc/hatchway/agent.json").stat()
    assert (config.st_mode & 0o777, config.st_uid) == (0o600, int(uid))
    assert installed.config["credential"]


def test_linux_installer_leaves_a_node_the_admin_sees(installed: Installed) -> None:
    node = installed.plane.node(installed.config["node_id"])
    assert node["name"] == "lab-box"
    assert node["state"] == "offline"  # installed into a root: nothing started
    assert installed.config["node_id"] in installed.output


def test_linux_installer_copies_the_model_for_the_service_and_serves_it_by_name(installed: Installed) -> None:
    _, _, uid, *_ = installed.user()
    copied = installed.path("/var/lib/hatchway-agent/models/smollm2.gguf").stat()
    assert (copied.st_mode & 0o777, copied.st_uid) == (0o640, int(uid))
    unit = installed.path("/etc/systemd/system/hatchway-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(f"--slots 2 --model /var/lib/hatchway-agent/models/smollm2.gguf={DEMO_MODEL}")


def test_linux_installer_writes_a_unit_that_systemd_analyze_verify_accepts(installed: Installed) -> None:
    unit = installed.path("/etc/systemd/system/hatchway-agent.service")
    assert unit.stat().st_mode & 0o777 == 0o644
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={installed.root}", "hatchway-agent.service"],
        capture_output=True,
        text=True,
        cwd=installed.root,
    )
    # verify warns (unknown keys, missing executables) without failing: silence is the pass.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_linux_installer_enables_the_unit_for_the_next_boot(installed: Installed) -> None:
    wanted = installed.path("/etc/systemd/system/multi-user.target.wants/hatchway-agent.service")
    assert os.readlink(wanted) == "/etc/systemd/system/hatchway-agent.service"


def test_linux_unit_sandbox_is_rated_ok_by_systemd_analyze_security(installed: Installed) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={installed.root}", "hatchway-agent.service"],
        capture_output=True,
        text=True,
        cwd=installed.root,
    )
    level = re.search(r"Overall exposure level for hatchway-agent.service: [\d.]+ (\w+)", result.stdout)
    assert level is not None, result.stdout + result.stderr
    assert level.group(1) in ("SAFE", "OK")


# -- Linux: running it again, refusing, removing -------------------------------------------------------------------


def test_linux_installer_takes_the_token_from_the_environment(build: Path, plane: Plane, target_root: Path) -> None:
    ok(install(target_root, build, "--plane", plane.node_address, env={"HATCHWAY_ENROLL_TOKEN": plane.token()}))
    config = json.loads((target_root / "etc" / "hatchway" / "agent.json").read_text())
    assert plane.node(config["node_id"])["org"] == "acme"


def test_linux_installer_run_again_from_a_tarball_changes_nothing_and_keeps_the_node(
    build: Path, plane: Plane, model: Path, target_root: Path, tmp_path: Path
) -> None:
    enroll = ("--plane", plane.node_address, "--token", plane.token())
    ok(install(target_root, build, *enroll, "--model", f"{model}={DEMO_MODEL}"))
    before = snapshot(target_root)
    tarball = tmp_path / "hatchway-agent-linux.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:
        archive.add(build, arcname="hatchway-agent")
    # No token this time: an enrolled machine is not enrolled again (the first token is used up anyway).
    again = ok(install(target_root, tarball, "--model", f"{model}={DEMO_MODEL}"))
    assert "Already enrolled" in again.stdout
    assert snapshot(target_root) == before


def test_linux_installer_refuses_without_root_and_changes_nothing(build: Path, target_root: Path) -> None:
    before = snapshot(target_root)
    argv = [*AS_NOBODY, "sh", str(LINUX_INSTALL), "--root", str(target_root), "--from", str(build)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "must run as root" in result.stderr
    assert snapshot(target_root) == before


def test_linux_installer_refuses_to_install_an_unenrolled_node_without_a_token(
    build: Path, plane: Plane, target_root: Path
) -> None:
    result = install(target_root, build, "--plane", plane.node_address)
    assert result.returncode == 1
    assert "an enrollment token is needed" in result.stderr


def test_linux_uninstall_removes_everything_the_installer_added_and_can_run_again(
    build: Path, plane: Plane, model: Path, target_root: Path
) -> None:
    before = snapshot(target_root)
    enroll = ("--plane", plane.node_address, "--token", plane.token())
    ok(install(target_root, build, *enroll, "--model", f"{model}={DEMO_MODEL}"))
    assert snapshot(target_root) != before
    ok(uninstall(target_root))
    assert snapshot(target_root) == before
    ok(uninstall(target_root))
    assert snapshot(target_root) == before


# -- macOS -----------------------------------------------------------------------------------------------------------


def test_macos_installer_loads_a_launchd_plist_that_runs_the_installed_program(build: Path, model: Path) -> None:
    argv = ["sh", str(MACOS_INSTALL), "--dry-run", "--from", str(build), "--plane", "plane.example:8443"]
    result = ok(subprocess.run([*argv, "--token", "t", "--model", f"{model}=m"], capture_output=True, text=True))
    plan = result.stdout
    assert f"+ ditto {build} /usr/local/hatchway-agent.new\n" in plan
    assert "+ mv /usr/local/hatchway-agent.new /usr/local/hatchway-agent\n" in plan
    xml = re.search(r"# write /Library/LaunchDaemons/com.hatchway.agent.plist.*?\n(.*?)# end of", plan, re.DOTALL)
    assert xml is not None, plan
    plist = plistlib.loads(xml.group(1).encode())
    program, *args = plist["ProgramArguments"]
    assert program == "/usr/local/hatchway-agent/hatchway-agent" and (build / "hatchway-agent").is_file()
    assert args == [
        "run",
        "--config",
        "/Library/Application Support/Hatchway/agent.json",
        "--model",
        "/Library/Application Support/Hatchway/models/smollm2.gguf=m",
    ]
    assert plist["UserName"] == "_hatchway"
    assert "\nlaunchctl bootstrap system /Library/LaunchDaemons/com.hatchway.agent.plist" in plan


def test_macos_installer_refuses_without_root(build: Path) -> None:
    argv = [*AS_NOBODY, "sh", str(MACOS_INSTALL), "--from", str(build)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "must run as root" in result.stderr


# -- static checks: shell, PowerShell, Dockerfiles, compose, the CI workflow -----------------------------------------


def test_installer_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(INSTALLERS.rglob("*.sh"))
    assert len(scripts) == 6
    result = subprocess.run(
        [str(TOOLS / "shellcheck"), "--shell=sh", *map(str, scripts)], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout) == (0, "")


def powershell_tree(script: Path) -> Node:
    return Parser(Language(tree_sitter_powershell.language())).parse(script.read_bytes()).root_node


def nodes(root: Node, *types: str) -> Iterator[Node]:
    if root.type in types:
        yield root
    for child in root.children:
        yield from nodes(child, *types)


@pytest.mark.parametrize("script", POWERSHELL_SCRIPTS, ids=lambda p: p.name)
def test_powershell_script_parses_without_errors(script: Path) -> None:
    tree = powershell_tree(script)
    broken = [(n.start_point, n.text) for n in nodes(tree, "ERROR") if n.text] + [
        (n.start_point, n.type) for n in nodes(tree) if n.is_missing
    ]
    assert not tree.has_error and not broken, broken


# Variables PowerShell itself sets.
AUTOMATIC_VARIABLES = {"_", "args", "error", "false", "lastexitcode", "null", "psitem", "psscriptroot", "true"}


def variable_name(node: Node) -> str:
    name = (node.text or b"").decode().lstrip("$@").strip("{}").lower()
    return name.split(":", 1)[1] if name.startswith(("script:", "global:", "local:")) else name


@pytest.mark.parametrize("script", POWERSHELL_SCRIPTS, ids=lambda p: p.name)
def test_powershell_script_reads_only_variables_it_defines(script: Path) -> None:
    """A typo in a variable name is no error in PowerShell until Set-StrictMode meets it at run time."""
    tree = powershell_tree(script)
    defined = set(AUTOMATIC_VARIABLES)
    for holder in nodes(tree, "script_parameter", "foreach_statement"):
        defined.update(variable_name(v) for v in holder.children if v.type == "variable")
    for assignment in nodes(tree, "assignment_expression"):
        defined.update(variable_name(v) for v in nodes(assignment.children[0], "variable"))
    read = {variable_name(v) for v in nodes(tree, "variable") if not variable_name(v).startswith("env:")}
    assert read - defined == set()


@pytest.mark.parametrize("script", POWERSHELL_SCRIPTS, ids=lambda p: p.name)
def test_powershell_script_refuses_to_run_without_administrator_rights(script: Path) -> None:
    head = script.read_text().splitlines()[:5]
    assert "#Requires -RunAsAdministrator" in head
    assert "$ErrorActionPreference = 'Stop'" in script.read_text()


def test_windows_installer_registers_the_service_through_the_agent_itself() -> None:
    text = (INSTALLERS / "windows" / "install.ps1").read_text()
    assert "@('service', 'install', '--exec', $Exe, '--config', $ConfigPath)" in text
    assert "'Hatchway\\agent'" in text and "$env:ProgramData 'Hatchway'" in text


def test_dockerfiles_pass_hadolint() -> None:
    assert [d.name for d in DOCKERFILES] == ["agent.Dockerfile", "plane.Dockerfile"]
    result = subprocess.run([str(TOOLS / "hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "")


def final_stage(dockerfile: Path, name: str | None = None) -> list[str]:
    """The instructions of the named stage (else the last), one line each, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    if name is not None:
        starts = [i for i in starts if lines[i].endswith(f" AS {name}")]
    stage = lines[starts[-1] :]
    ends = [i for i, line in enumerate(stage) if i and line.startswith("FROM ")]
    return stage[: ends[0]] if ends else stage


@pytest.mark.parametrize(("dockerfile", "stage", "volume"), [
    ("plane.Dockerfile", None, "/var/lib/hatchway"),
    ("agent.Dockerfile", "runtime", "/var/lib/hatchway-agent"),
])  # fmt: skip
def test_images_run_as_a_non_root_user_with_a_healthcheck_and_a_state_volume(
    dockerfile: str, stage: str | None, volume: str
) -> None:
    lines = final_stage(INSTALLERS / "docker" / dockerfile, stage)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") and " CMD " in line for line in lines)
    assert f'VOLUME ["{volume}"]' in lines


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    return yaml.safe_load((INSTALLERS / "docker" / name).read_text())  # type: ignore[no-any-return]


def test_compose_runs_the_plane_and_an_agent_that_serves_the_demo_model() -> None:
    services = compose()["services"]
    assert set(services) == {"plane", "enroll-token", "agent"}
    for service in ("plane", "agent"):
        build = services[service]["build"]
        assert (INSTALLERS / "docker" / build["context"] / build["dockerfile"]).is_file()
    assert services["agent"]["build"]["target"] == "demo"
    assert "FROM runtime AS demo" in (INSTALLERS / "docker" / "agent.Dockerfile").read_text()
    assert services["enroll-token"]["depends_on"] == {"plane": {"condition": "service_healthy"}}
    assert services["agent"]["depends_on"] == {"enroll-token": {"condition": "service_completed_successfully"}}
    assert services["agent"]["environment"]["HATCHWAY_PLANE"] == "plane:8443"
    assert set(compose()["volumes"]) == {"plane-data", "agent-data", "enrollment"}


def test_compose_planes_gives_every_plane_the_same_stores_and_secrets_and_the_agent_every_plane() -> None:
    doc = compose("compose.planes.yaml")
    services = doc["services"]
    planes = sorted(name for name in services if name.startswith("plane-"))
    assert planes == ["plane-a", "plane-b"]
    shared = ("DATABASE_URL", "REDIS_URL", "NATS_URL", "SECRET_KEY", "ADMIN_KEY", "GRPC_TLS_CERT", "GRPC_TLS_KEY")
    environments = [services[name]["environment"] for name in planes]
    for setting in shared:
        values = {env[f"HATCHWAY_{setting}"] for env in environments}
        assert len(values) == 1, f"HATCHWAY_{setting} differs between planes: {values}"
    assert len({env["HATCHWAY_PLANE_NAME"] for env in environments}) == len(planes)
    for name in planes:
        assert services[name]["depends_on"]["node-ca"] == {"condition": "service_completed_successfully"}
    assert services["agent"]["environment"]["HATCHWAY_PLANE"] == ",".join(f"{name}:8443" for name in planes)
    balancer = doc["configs"]["balancer"]["content"]
    assert all(f"server {name}:8080" in balancer for name in planes) and "proxy_buffering off" in balancer
    assert set(doc["volumes"]) >= {f"{name}-data" for name in planes} | {"node-ca", "postgres-data"}


def test_compose_gpu_override_reserves_nvidia_gpus_for_a_cuda_agent() -> None:
    agent = compose("compose.gpu.yaml")["services"]["agent"]
    assert agent["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert "-DGGML_CUDA=on" in agent["build"]["args"]["CMAKE_ARGS"]


def test_ci_workflow_passes_actionlint_with_shellcheck() -> None:
    env = {**os.environ, "PATH": f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(TOOLS / "actionlint"), str(WORKFLOW)], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout) == (0, "")


def test_ci_workflow_smoke_tests_the_agent_on_three_systems_and_builds_both_images() -> None:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert jobs["agent"]["strategy"]["matrix"]["os"] == ["ubuntu-latest", "macos-latest", "windows-latest"]
    agent_steps = " ".join(step.get("run", "") for step in jobs["agent"]["steps"])
    assert "installers/pyinstaller/hatchway-agent.spec" in agent_steps
    assert "python installers/ci/smoke.py --build dist/hatchway-agent" in agent_steps
    image_steps = " ".join(step.get("run", "") for step in jobs["images"]["steps"])
    for dockerfile in DOCKERFILES:
        assert f"docker build -f installers/docker/{dockerfile.name}" in image_steps
