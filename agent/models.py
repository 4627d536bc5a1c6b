"""What the agent serves: one `ModelConfig` per GGUF file, built from the CLI form `PATH[=SERVED_NAME]`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `gpu_layers` that agent.gpufit resolves from the GGUF's metadata and the GPU's free memory at load.
AUTO = "auto"

# Below this a slot cannot hold a chat template's framing plus a useful answer.
MIN_CONTEXT = 16


@dataclass(frozen=True)
class ModelConfig:
    """One GGUF model as the agent serves it.

    Parameters:
        path: the GGUF file.
        name: the name clients ask for; defaults to the file's stem.
        slots: how many requests the model serves at once; each slot holds its own llama.cpp context.
        context: tokens of context per slot (prompt plus completion).
        threads: CPU threads per slot; None lets llama.cpp choose.
        gpu_layers: layers offloaded to the GPU; -1 offloads all of them; "auto" (the default) as many as the
            free VRAM holds, none without a GPU (agent.gpufit).
        price_in, price_out: USD per million prompt / completion tokens, advertised to the plane.
        chat_template: a Jinja template that replaces the one stored in the GGUF.
        embeddings: load the model for /v1/embeddings instead of text generation.

    Construction checks values only; `parse` also checks that the file exists, because a file that vanishes
    later must not stop the agent (the engine reports it as an issue instead).
    """

    path: Path
    name: str = ""
    slots: int = 1
    context: int = 2048
    threads: int | None = None
    gpu_layers: int | str = AUTO
    price_in: float | None = None
    price_out: float | None = None
    chat_template: str | None = None
    embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.path.stem)
        if not self.name or any(char.isspace() for char in self.name):
            raise ValueError(f"model name {self.name!r} must be non-empty and contain no whitespace")
        if self.slots < 1:
            raise ValueError(f"model {self.name}: slots must be at least 1, got {self.slots}")
        if self.context < MIN_CONTEXT:
            raise ValueError(f"model {self.name}: context must be at least {MIN_CONTEXT} tokens, got {self.context}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"model {self.name}: threads must be at least 1, got {self.threads}")
        if self.gpu_layers != AUTO and (
            not isinstance(self.gpu_layers, int) or isinstance(self.gpu_layers, bool) or self.gpu_layers < -1
        ):
            expected = f"{AUTO!r}, -1 (all) or a number of layers"
            raise ValueError(f"model {self.name}: gpu_layers must be {expected}, got {self.gpu_layers!r}")
        for label, price in (("price_in", self.price_in), ("price_out", self.price_out)):
            if price is not None and not (math.isfinite(price) and price >= 0):
                raise ValueError(f"model {self.name}: {label} must be a finite number >= 0, got {price}")
        if self.chat_template is not None and not self.chat_template.strip():
            raise ValueError(f"model {self.name}: chat_template is empty")

    @classmethod
    def parse(cls, spec: str, **defaults: Any) -> ModelConfig:
        """Build a config from `PATH[=SERVED_NAME]`; `defaults` fill the other fields (slots=2, ...).

        A spec that names an existing file as a whole is a path, so a file name containing "=" still works.
        """
        candidate = Path(spec).expanduser()
        if candidate.is_file() or "=" not in spec:
            path, name = candidate, ""
        else:
            raw_path, _, name = spec.rpartition("=")
            path = Path(raw_path).expanduser()
            if not name:
                raise ValueError(f"model spec {spec!r}: the served name after '=' is empty")
        if not path.is_file():
            raise ValueError(f"model file not found: {path}")
        options = dict(defaults)
        if name:
            options["name"] = name
        try:
            return cls(path=path, **options)
        except TypeError as exc:
            raise ValueError(f"model spec {spec!r}: {exc}") from exc

    @classmethod
    def from_dict(cls, doc: Any) -> ModelConfig:
        """A model as the config file stores it (see agent.config)."""
        if not isinstance(doc, dict) or "path" not in doc:
            raise ValueError(f"a model needs at least a path, got {doc!r}")
        return cls(**{**doc, "path": Path(doc["path"]).expanduser()})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path)}
