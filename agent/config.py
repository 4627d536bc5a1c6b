"""The agent's configuration file: where the planes are, who this node is, and what it serves.

JSON, written by `hatchway-agent enroll` with mode 0600 (it holds the node credential), and readable by hand:

    {"plane": "plane-a.example.com:8443", "planes": ["plane-a.example.com:8443", "plane-b.example.com:8443"],
     "node_id": "node_...", "credential": "hwn-...", "ca_pem": "...",
     "name": "lab-box", "machine_id": "...", "insecure": false, "mode": "always-on",
     "idle": {"cpu_percent": 50, "gpu_percent": 30, "pause_after_s": 5, "resume_after_s": 60},
     "models": [{"path": "/models/llama.gguf", "name": "llama-3.1-8b", "slots": 2, "context": 4096,
                 "threads": 8, "gpu_layers": 99, "price_in": 0.1, "price_out": 0.2}]}

Its default place follows the OS (`default_path`); `--config` or `HATCHWAY_AGENT_CONFIG` choose another.

`plane` is the address enrolled with, first of the planes the agent dials in turn (agent.connection); `planes`,
written only when there are several, lists them all, `plane` first. A file with `plane` alone (every file written
before there could be several, and every single-plane file since) stays readable by older agents too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.models import ModelConfig

MODES = ("always-on", "idle-only")


class AgentConfigError(ValueError):
    """The config file is missing, unreadable, or says something impossible; the message says which."""


@dataclass(frozen=True)
class IdleThresholds:
    """idle-only mode: the owner's own load above these for `pause_after_s` pauses the node; below them for
    `resume_after_s` resumes it (the gap between the two is the hysteresis that keeps it from flapping)."""

    cpu_percent: float = 50.0
    gpu_percent: float = 30.0
    pause_after_s: float = 5.0
    resume_after_s: float = 60.0


@dataclass(frozen=True)
class AgentConfig:
    planes: tuple[str, ...] = ()
    node_id: str = ""
    credential: str = ""
    ca_pem: str = ""
    name: str = ""
    machine_id: str = ""
    insecure: bool = False
    mode: str = "always-on"
    idle: IdleThresholds = field(default_factory=IdleThresholds)
    models: tuple[ModelConfig, ...] = ()

    @property
    def plane(self) -> str:
        """The plane enrolled with (the first one dialled), or "" before enrollment."""
        return self.planes[0] if self.planes else ""

    @property
    def enrolled(self) -> bool:
        return bool(self.node_id and self.credential)

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)

    # -- file -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        if not path.exists():
            return cls()
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AgentConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise AgentConfigError(f"{path}: expected a JSON object")
        try:
            planes = _planes(doc.pop("plane", ""), doc.pop("planes", []))
            models = tuple(ModelConfig.from_dict(m) for m in doc.pop("models", []))
            idle = IdleThresholds(**doc.pop("idle", {}))
            config = cls(**doc, planes=planes, idle=idle, models=models)
        except (TypeError, ValueError) as exc:
            raise AgentConfigError(f"{path}: {exc}") from exc
        if config.mode not in MODES:
            raise AgentConfigError(f"{path}: mode must be one of {', '.join(MODES)}")
        return config

    def save(self, path: Path) -> None:
        """Write atomically and privately: the file holds the node credential."""
        doc = dataclasses.asdict(self)
        del doc["planes"]
        # `plane` first and alone for one plane: the format every agent reads (see the module's docstring).
        doc = {"plane": self.plane, **({"planes": list(self.planes)} if len(self.planes) > 1 else {}), **doc}
        doc["models"] = [m.to_dict() for m in self.models]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
        os.replace(tmp, path)


def _planes(plane: object, planes: object) -> tuple[str, ...]:
    """`plane`, then the other `planes` in their order, each once: a hand edit of `plane` alone still counts."""
    if not isinstance(plane, str):
        raise ValueError("plane must be a string, HOST:PORT")
    if not isinstance(planes, list) or not all(isinstance(p, str) for p in planes):
        raise ValueError("planes must be a list of strings, HOST:PORT each")
    return tuple(dict.fromkeys(p for p in (plane, *planes) if p))


def default_path() -> Path:
    override = os.environ.get("HATCHWAY_AGENT_CONFIG")
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "Hatchway" / "agent.json"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Hatchway" / "agent.json"
    if os.geteuid() == 0:
        return Path("/etc/hatchway/agent.json")
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "hatchway" / "agent.json"


def machine_id(config_path: Path) -> str:
    """Stable for this machine *and* this config file: re-enrolling keeps the node id, while two agents on one
    machine (two GPUs, two configs) stay two nodes."""
    base = ""
    for candidate in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            base = candidate.read_text().strip()
            break
        except OSError:
            continue
    if not base:
        base = str(uuid.getnode())
    return hashlib.sha256(f"{base}:{config_path.resolve()}".encode()).hexdigest()[:32]
