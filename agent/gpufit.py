"""How many of a model's layers to put on the GPU (`--gpu-layers auto`), from the GGUF's metadata and NVML.

`read_gguf` parses a GGUF file's header (magic, version, key/value metadata, tensor table) without loading the
model: the format is small and documented (ggml's docs/gguf.md), and reading it directly keeps the agent free of
another dependency. `fit` then counts how many layers fit in a GPU's free memory: each offloaded layer costs its
weights plus its KV cache, once per slot (each slot is a llama.cpp context of its own, and each context uploads its
own copy of the offloaded weights); the output layer (llama.cpp's layer n+1) costs the output matrix; each context
needs a compute buffer; and a margin is left for the driver, other processes and estimation error.

`resolve` is what the engine calls per model: an explicit number is kept (reported as such), `auto` becomes 0
without a GPU llama.cpp can use (this build cannot offload, or NVML sees no GPU), all layers on Metal (unified
memory, llama.cpp's own default there), and otherwise the fit against the first GPU the agent sees. With several
GPUs visible llama.cpp spreads offloaded layers over all of them, so fitting against one is conservative; one agent
per GPU (CUDA_VISIBLE_DEVICES=N) uses each fully.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.hardware import Gpu, read_gpus
from agent.models import AUTO, ModelConfig

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# KV cache element: llama.cpp's default cache type is f16.
KV_BYTES_PER_ELEMENT = 2
# llama.cpp's default physical batch (n_ubatch): the compute buffer holds activations for this many tokens.
UBATCH = 512
# Kept free on the GPU: a tenth of its memory (the driver, the desktop, other processes' growth) plus 256 MiB
# (CUDA's own context and the estimate's error).
MARGIN_FRACTION = 0.10
MARGIN_FIXED_BYTES = 256 * 1024 * 1024

# ggml type id -> (elements per block, bytes per block), as ggml's GGML_QUANT_SIZES lists them.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Numeric arrays up to this long are kept (per-layer head counts); longer ones (a vocabulary) only by their length.
_SMALL_ARRAY = 4096


class GgufError(ValueError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True)
class Tensor:
    name: str
    ggml_type: int
    elements: int
    offset: int  # from the start of the tensor data
    size_bytes: int


@dataclass(frozen=True)
class Gguf:
    """What the fit needs from a GGUF file. `metadata` holds scalars and short numeric arrays; `array_lengths`
    every array's length (the vocabulary's included)."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[Tensor]
    data_offset: int  # where the tensor data starts in the file
    file_bytes: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_int(self, key: str, default: int = 0) -> int:
        """`{architecture}.{key}`; a per-layer array counts as its largest entry (the fit must cover every layer)."""
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if isinstance(value, list):
            return int(max(value, default=default))
        return int(value)

    @property
    def block_count(self) -> int:
        return self.arch_int("block_count")

    @property
    def layer_bytes(self) -> list[int]:
        """Weight bytes of each repeating layer `blk.N.*`, in order."""
        sizes = [0] * self.block_count
        for tensor in self.tensors:
            layer = _layer_of(tensor.name)
            if layer is not None and layer < len(sizes):
                sizes[layer] += tensor.size_bytes
        return sizes

    @property
    def output_bytes(self) -> int:
        """The output layer's weights: `output.weight` (with its norm), or the token embedding when the two are
        tied, which llama.cpp then uploads again as the output matrix."""
        by_name = {t.name: t.size_bytes for t in self.tensors}
        matrix = by_name.get("output.weight", by_name.get("token_embd.weight", 0))
        return matrix + by_name.get("output_norm.weight", 0)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.size_bytes for t in self.tensors)

    @property
    def vocab_size(self) -> int:
        return self.arch_int("vocab_size") or self.array_lengths.get("tokenizer.ggml.tokens", 0)

    def kv_bytes_per_layer(self, context: int) -> int:
        """One layer's K and V cache for one context of `context` tokens, in f16."""
        heads = self.arch_int("attention.head_count") or 1
        heads_kv = self.arch_int("attention.head_count_kv") or heads
        head_dim = self.arch_int("embedding_length") // heads
        k_dim = (self.arch_int("attention.key_length") or head_dim) * heads_kv
        v_dim = (self.arch_int("attention.value_length") or head_dim) * heads_kv
        return context * (k_dim + v_dim) * KV_BYTES_PER_ELEMENT

    def compute_bytes(self, context: int) -> int:
        """An allowance for one context's compute buffer on the GPU: the logits and the activations of a
        UBATCH-token batch in f32, and its attention scores against the whole context."""
        heads = self.arch_int("attention.head_count") or 1
        per_token = self.vocab_size + 4 * self.arch_int("embedding_length") + heads * context
        return 4 * UBATCH * per_token


def read_gguf(path: Path) -> Gguf:
    """Parse the header and tensor table of the GGUF at `path` (versions 2 and 3); raises GgufError."""
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return _Reader(view).gguf()
    except (OSError, ValueError, struct.error, IndexError, OverflowError) as exc:
        if isinstance(exc, GgufError):
            raise
        raise GgufError(f"{path}: not a readable GGUF file: {exc}") from exc


class _Reader:
    def __init__(self, view: mmap.mmap) -> None:
        self.view = view
        self.at = 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.view, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.at + length > len(self.view):
            raise GgufError("a string runs past the end of the file")
        text = self.view[self.at : self.at + length].decode("utf-8", errors="replace")
        self.at += length
        return text

    def skip_string(self) -> None:
        length = self.take("<Q")  # read first: `self.at += self.take(...)` would add to the old position
        self.at += length

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        raise GgufError(f"unknown metadata value type {kind}")

    def gguf(self) -> Gguf:
        if self.view[:4] != GGUF_MAGIC:
            raise GgufError(f"bad magic {self.view[:4]!r}, expected {GGUF_MAGIC!r}")
        self.at = 4
        version = self.take("<I")
        if version not in (2, 3):
            raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = self.take("<Q"), self.take("<Q")
        metadata: dict[str, Any] = {}
        array_lengths: dict[str, int] = {}
        for _ in range(kv_count):
            key, kind = self.string(), self.take("<I")
            if kind != _ARRAY:
                metadata[key] = self.value(kind)
                continue
            item_kind, length = self.take("<I"), self.take("<Q")
            array_lengths[key] = length
            if item_kind == _STRING:
                for _ in range(length):
                    self.skip_string()
            elif item_kind in _SCALARS:
                size = struct.calcsize(_SCALARS[item_kind])
                if length <= _SMALL_ARRAY:
                    metadata[key] = list(struct.unpack_from(f"<{length}{_SCALARS[item_kind][1]}", self.view, self.at))
                self.at += size * length
            else:
                raise GgufError(f"{key}: arrays of type {item_kind} are not supported")
        raw = []
        for _ in range(tensor_count):
            name, dims = self.string(), self.take("<I")
            elements = 1
            for _ in range(dims):
                elements *= self.take("<Q")
            raw.append((name, self.take("<I"), elements, self.take("<Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_offset = -(-self.at // alignment) * alignment
        tensors = _sized(raw, len(self.view) - data_offset)
        return Gguf(version, metadata, array_lengths, tensors, data_offset, len(self.view))


def _sized(raw: list[tuple[str, int, int, int]], data_bytes: int) -> list[Tensor]:
    """Each tensor's bytes from its type; a type this table does not know is sized by the gap to the next
    tensor's offset, which is what the file gives it."""
    ends = sorted({offset for *_, offset in raw} | {data_bytes})
    tensors = []
    for name, ggml_type, elements, offset in raw:
        if ggml_type in GGML_BLOCKS:
            per_block, block_bytes = GGML_BLOCKS[ggml_type]
            size = -(-elements // per_block) * block_bytes
        else:
            size = next(end for end in ends if end > offset) - offset
        tensors.append(Tensor(name, ggml_type, elements, offset, size))
    return tensors


def _layer_of(name: str) -> int | None:
    prefix, _, rest = name.partition(".")
    if prefix != "blk":
        return None
    number, _, _ = rest.partition(".")
    return int(number) if number.isdigit() else None


# -- the fit --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFit:
    """The layers a model is offloaded with, and why.

    layers: what llama.cpp is given as n_gpu_layers (-1: all); offloaded: how many of total_layers that is
    (total_layers counts the output layer, as llama.cpp does: block_count + 1); bytes_needed: the estimate for
    `offloaded` layers; bytes_free: the GPU's free memory the estimate was held against (0 when none was read);
    gpu: the GPU fitted against ("" when none).
    """

    layers: int
    offloaded: int
    total_layers: int
    bytes_needed: int
    bytes_free: int
    reason: str
    gpu: str = ""


def margin_bytes(gpu: Gpu) -> int:
    total = gpu.vram_total_bytes or gpu.vram_free_bytes or 0
    return int(total * MARGIN_FRACTION) + MARGIN_FIXED_BYTES


def fit(model: Gguf, *, slots: int, context: int, gpu: Gpu) -> GpuFit:
    """As many layers as fit in `gpu`'s free memory less the margin, for `slots` contexts of `context` tokens.

    llama.cpp offloads the last n repeating layers, then (n = block_count + 1) the output layer.
    """
    blocks = model.block_count
    total = blocks + 1
    free = gpu.vram_free_bytes or 0
    label = f"GPU {gpu.index} ({gpu.name})"
    budget = free - margin_bytes(gpu)
    kv = model.kv_bytes_per_layer(context)
    needed = slots * model.compute_bytes(context)
    layers = 0
    for weights in reversed(model.layer_bytes):
        if needed + slots * (weights + kv) > budget:
            break
        needed += slots * (weights + kv)
        layers += 1
    if layers == blocks and needed + slots * model.output_bytes <= budget:
        needed += slots * model.output_bytes
        layers = total
    full = needed if layers == total else _full_bytes(model, slots, context)
    if layers == 0:
        needed = 0
        margin = _mib(margin_bytes(gpu))
        why = f"{_mib(free)} free on {label} less a {margin} margin holds no layer ({_mib(full)} for all)"
    elif layers == total:
        why = f"all {total} layers fit in {_mib(free)} free on {label} ({_mib(needed)} for {slots} slot(s))"
    else:
        why = f"{layers} of {total} layers fit in {_mib(free)} free on {label} ({_mib(full)} needed for all)"
    return GpuFit(
        layers=-1 if layers == total else layers,
        offloaded=layers,
        total_layers=total,
        bytes_needed=needed,
        bytes_free=free,
        reason=why,
        gpu=label,
    )


def _full_bytes(model: Gguf, slots: int, context: int) -> int:
    kv = model.kv_bytes_per_layer(context)
    per_slot = model.compute_bytes(context) + sum(w + kv for w in model.layer_bytes) + model.output_bytes
    return slots * per_slot


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MiB"


# -- what the engine asks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """The llama.cpp build loaded: `name` cpu, cuda, metal, vulkan, rocm or sycl; `offload`: it can put layers on
    a GPU (llama_supports_gpu_offload)."""

    name: str
    offload: bool


@functools.cache
def backend() -> Backend:
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    info = llama_cpp.llama_print_system_info()
    text = (info.decode("utf-8", errors="replace") if isinstance(info, bytes) else str(info)).upper()
    libs = ""
    with contextlib.suppress(OSError):  # a frozen build may keep the libraries elsewhere: system info then decides
        libs = " ".join(os.listdir(Path(llama_cpp.__file__).parent / "lib")).upper() if offload else ""
    for name, marks in (
        ("cuda", ("CUDA",)),
        ("rocm", ("HIP", "ROCM")),
        ("metal", ("METAL", "MTL")),
        ("vulkan", ("VULKAN",)),
        ("sycl", ("SYCL",)),
    ):
        if offload and any(mark in text or mark in libs for mark in marks):
            return Backend(name, offload)
    return Backend("gpu" if offload else "cpu", offload)


def first_visible(gpus: Sequence[Gpu]) -> Gpu | None:
    """The GPU llama.cpp uses first: CUDA_VISIBLE_DEVICES' first entry when it names an NVML index, else GPU 0.

    None when CUDA_VISIBLE_DEVICES hides every GPU; when it names them by UUID, which this does not map, the one
    with the least free memory, so the fit errs on the safe side."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus[0] if gpus else None
    first = visible.split(",")[0].strip()
    if first in ("", "-1"):
        return None
    if first.isdigit():
        return next((g for g in gpus if g.index == int(first)), None)
    return min(gpus, key=lambda g: g.vram_free_bytes or 0, default=None)


def resolve(
    config: ModelConfig,
    *,
    build: Backend | None = None,
    gpus: Callable[[], tuple[list[Gpu], str]] = read_gpus,
) -> GpuFit:
    """The layers to load `config` with; `build` and `gpus` stand in for llama.cpp and NVML in tests."""
    build = build or backend()
    try:
        model: Gguf | None = read_gguf(config.path)
    except GgufError:
        model = None
    total = model.block_count + 1 if model is not None else 0
    if config.gpu_layers != AUTO:
        layers = int(config.gpu_layers)
        if not build.offload:
            why = f"set to {layers}, but this llama.cpp build ({build.name}) cannot offload"
            return GpuFit(layers, 0, total, 0, 0, why)
        offloaded = total if layers < 0 or layers > total else layers
        return GpuFit(layers, offloaded, total, 0, 0, f"set to {layers}")
    if not build.offload:
        return GpuFit(0, 0, total, 0, 0, f"auto: this llama.cpp build ({build.name}) cannot offload")
    if build.name == "metal":
        return GpuFit(-1, total, total, 0, 0, "auto: all layers on Metal (unified memory)")
    readings, status = gpus()
    gpu = first_visible(readings)
    if gpu is None or not gpu.vram_free_bytes:
        return GpuFit(0, 0, total, 0, 0, f"auto: no GPU memory reading from NVML ({status})")
    if model is None:
        return GpuFit(0, 0, total, 0, gpu.vram_free_bytes, f"auto: {config.path} has no GGUF metadata to fit by")
    result = fit(model, slots=config.slots, context=config.context, gpu=gpu)
    return dataclasses.replace(result, reason=f"auto: {result.reason}")
