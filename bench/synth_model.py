"""Models with random weights, of a real model's shape, for GPU benchmarks on a machine no model can reach.

The GPU benchmark runs on a remote machine that receives at most 64 MiB of files and has no network: neither the
demo model (SmolLM2-135M-Instruct, ~100 MB) nor a 1-3 B model can travel there. A model's speed depends on its
shape (layers, widths, vocabulary, quantization), not on what its weights say, so the models are written on that
machine from a small template with random weights.

Two steps, two subcommands:

- `template SOURCE.gguf OUT.gguf`: every metadata key/value of SOURCE (the tokenizer included: tokens, merges,
  token types, chat template, special token ids) and no tensors. A few MB: this is the file that travels.
- `make --template T.gguf --shape NAME --out OUT.gguf [--threads N]`: a llama-architecture model of a named shape
  (`SHAPES`): the template's metadata with the shape's keys overridden, F16 tensors drawn from a normal
  distribution (std 0.02, fixed seed; one set of arrays shared by every block, since identical blocks cost the
  same to run and keep a 1.7 B model fast to write and light on memory), written to a temporary F16 file beside
  OUT and quantized by llama.cpp itself to the shape's type, as the real model is.

Figures measured on such a model are speed (tokens/s, latency, memory), never quality: its output is noise.

Run as `python bench/synth_model.py template ...` / `python bench/synth_model.py make ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ARCH = "llama"
SEED = 20241206
WEIGHT_STD = 0.02
# llama.cpp's `enum llama_ftype`.
FTYPE_F16 = 1
FTYPE_Q4_1 = 3
FTYPE_Q4_K_M = 15
TOKENS_KEY = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class Value:
    """One metadata value, with the GGUF types it is written with."""

    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class Dims:
    """A llama-architecture model's dimensions, all known."""

    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context_length: int
    rope_freq_base: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class Shape:
    """A named model shape. A dimension left None is the template's own (so `smollm2-135m` is whatever the demo
    model's file says, never a copy of it that could drift)."""

    name: str
    ftype: int
    size_label: str
    n_embd: int | None = None
    n_layer: int | None = None
    n_ff: int | None = None
    n_head: int | None = None
    n_head_kv: int | None = None
    context_length: int | None = None
    rope_freq_base: float | None = None

    def resolve(self, metadata: Mapping[str, Value]) -> Dims:
        """The dimensions, with those the shape leaves open taken from the template's `metadata`."""

        def pick(own: int | float | None, key: str) -> Any:
            if own is not None:
                return own
            full = f"{ARCH}.{key}"
            if full not in metadata:
                raise ValueError(f"shape {self.name}: the template has no {full}")
            return metadata[full].value

        dims = Dims(
            n_embd=int(pick(self.n_embd, "embedding_length")),
            n_layer=int(pick(self.n_layer, "block_count")),
            n_ff=int(pick(self.n_ff, "feed_forward_length")),
            n_head=int(pick(self.n_head, "attention.head_count")),
            n_head_kv=int(pick(self.n_head_kv, "attention.head_count_kv")),
            context_length=int(pick(self.context_length, "context_length")),
            rope_freq_base=float(pick(self.rope_freq_base, "rope.freq_base")),
        )
        if dims.n_embd % dims.n_head or dims.n_head % dims.n_head_kv:
            raise ValueError(f"shape {self.name}: {dims} does not split into heads")
        return dims


SHAPES: dict[str, Shape] = {
    # The demo model: its dimensions are the template's (576 wide, 30 blocks, ff 1536, 9 heads, 3 KV heads).
    "smollm2-135m": Shape(name="smollm2-135m", ftype=FTYPE_Q4_1, size_label="135M"),
    # SmolLM2-1.7B-Instruct's config.json; same tokenizer as the 135M, so the demo model's template serves it.
    "smollm2-1.7b": Shape(
        name="smollm2-1.7b",
        ftype=FTYPE_Q4_K_M,
        size_label="1.7B",
        n_embd=2048,
        n_layer=24,
        n_ff=8192,
        n_head=32,
        n_head_kv=32,
        context_length=8192,
        rope_freq_base=130000.0,
    ),
}


class PlannedTensor(NamedTuple):
    """A tensor to write: numpy shape (out, in), which the gguf writer reverses into ggml's ne order."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)


def read_metadata(path: Path) -> dict[str, Value]:
    """Every metadata key/value of the GGUF at `path`, general.architecture included; not the reader's pseudo-fields
    (GGUF.version, GGUF.tensor_count, GGUF.kv_count), which describe the file rather than the model."""
    reader = GGUFReader(path)
    metadata: dict[str, Value] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"{path}: {key} is a nested array, which this copy does not handle")
            metadata[key] = Value(field.contents(), GGUFValueType.ARRAY, field.types[1])
        else:
            metadata[key] = Value(field.contents(), field.types[0])
    return metadata


def n_vocab(metadata: Mapping[str, Value]) -> int:
    return len(metadata[TOKENS_KEY].value)


def _writer(path: Path, metadata: Mapping[str, Value]) -> GGUFWriter:
    arch = metadata["general.architecture"].value
    writer = GGUFWriter(path, arch)
    for key, item in metadata.items():
        # The writer adds general.architecture itself.
        if key != "general.architecture":
            writer.add_key_value(key, item.value, item.type, sub_type=item.sub_type)
    return writer


def write_template(source: Path, out: Path) -> None:
    """`out`: all of `source`'s metadata and no tensors."""
    write_f16(out, read_metadata(source), plan=())


def model_metadata(template: Mapping[str, Value], shape: Shape) -> dict[str, Value]:
    """The template's metadata with `shape`'s dimensions, named as synthetic, typed as the F16 file that is then
    quantized (llama.cpp's quantizer writes the final file type)."""
    arch = template["general.architecture"].value
    if arch != ARCH:
        raise ValueError(f"the template is a {arch!r} model; the shapes here are {ARCH!r}")
    dims = shape.resolve(template)
    u32, f32, text = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    metadata = dict(template)
    metadata.update(
        {
            f"{ARCH}.embedding_length": Value(dims.n_embd, u32),
            f"{ARCH}.block_count": Value(dims.n_layer, u32),
            f"{ARCH}.feed_forward_length": Value(dims.n_ff, u32),
            f"{ARCH}.attention.head_count": Value(dims.n_head, u32),
            f"{ARCH}.attention.head_count_kv": Value(dims.n_head_kv, u32),
            f"{ARCH}.rope.dimension_count": Value(dims.head_dim, u32),
            f"{ARCH}.context_length": Value(dims.context_length, u32),
            f"{ARCH}.rope.freq_base": Value(dims.rope_freq_base, f32),
            f"{ARCH}.vocab_size": Value(n_vocab(template), u32),
            "general.name": Value(f"synthetic {shape.name} (random weights, for speed only)", text),
            "general.size_label": Value(shape.size_label, text),
            "general.file_type": Value(FTYPE_F16, u32),
        }
    )
    return metadata


def tensor_plan(dims: Dims, vocab: int) -> list[PlannedTensor]:
    """The llama-architecture tensors of a model of `dims`, in numpy shapes, without writing anything. No
    output.weight: like SmolLM2, the output matrix is the token embedding (tied)."""
    embd, ff = dims.n_embd, dims.n_ff
    kv = dims.head_dim * dims.n_head_kv
    plan = [PlannedTensor("token_embd.weight", (vocab, embd), F16), PlannedTensor("output_norm.weight", (embd,), F32)]
    block: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = [
        ("attn_norm", (embd,), F32),
        ("attn_q", (embd, embd), F16),
        ("attn_k", (kv, embd), F16),
        ("attn_v", (kv, embd), F16),
        ("attn_output", (embd, embd), F16),
        ("ffn_norm", (embd,), F32),
        ("ffn_gate", (ff, embd), F16),
        ("ffn_up", (ff, embd), F16),
        ("ffn_down", (embd, ff), F16),
    ]
    for layer in range(dims.n_layer):
        plan.extend(PlannedTensor(f"blk.{layer}.{role}.weight", shape, dtype) for role, shape, dtype in block)
    return plan


def parameter_count(plan: Sequence[PlannedTensor]) -> int:
    return sum(int(np.prod(t.shape)) for t in plan)


def _weights(tensor: PlannedTensor, rng: np.random.Generator) -> npt.NDArray[Any]:
    # Norm weights of ones keep activations at the scale the random matrices assume.
    if tensor.dtype == F32:
        return np.ones(tensor.shape, dtype=F32)
    return (rng.standard_normal(tensor.shape, dtype=np.float32) * WEIGHT_STD).astype(F16)


def write_f16(path: Path, metadata: Mapping[str, Value], plan: Sequence[PlannedTensor], seed: int = SEED) -> None:
    """An unquantized model at `path`: `plan`'s tensors with random weights, one array per role shared by all
    blocks (the writer keeps references, not copies, until it writes)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, npt.NDArray[Any]] = {}
    writer = _writer(path, metadata)
    try:
        for tensor in plan:
            role = tensor.name.split(".", 2)[2] if tensor.name.startswith("blk.") else tensor.name
            if role not in arrays:
                arrays[role] = _weights(tensor, rng)
            writer.add_tensor(tensor.name, arrays[role])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def quantize(source: Path, out: Path, ftype: int, threads: int) -> None:
    """llama.cpp's own quantizer (llama-quantize's), so the tensor types per role are the ones a real file of that
    type has (e.g. the tied embedding kept at higher precision than the blocks)."""
    import llama_cpp  # the agent extra; only `make` needs it

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {out}, ftype {ftype}) returned {code}")


def make_model(template: Path, shape: Shape, out: Path, threads: int | None = None, seed: int = SEED) -> None:
    """`out`: a model of `shape` with random weights, the template's tokenizer, quantized to the shape's type."""
    metadata = model_metadata(read_metadata(template), shape)
    plan = tensor_plan(shape.resolve(metadata), n_vocab(metadata))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out`: the same file system, which has room for the result, and a 1.7 B F16 file (~3.4 GB) might not
    # fit in /tmp.
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".f16.gguf", dir=out.parent)
    os.close(fd)
    f16 = Path(name)
    try:
        write_f16(f16, metadata, plan, seed)
        try:
            quantize(f16, out, shape.ftype, threads or os.cpu_count() or 1)
        except BaseException:
            # A half-written model would load as a truncated file on the benchmark machine.
            out.unlink(missing_ok=True)
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            f16.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    template = commands.add_parser("template", help="copy a GGUF's metadata (tokenizer included), no tensors")
    template.add_argument("source", type=Path)
    template.add_argument("out", type=Path)
    make = commands.add_parser("make", help="write a model of a named shape with random weights")
    make.add_argument("--template", type=Path, required=True)
    make.add_argument("--shape", choices=sorted(SHAPES), required=True)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="quantizer threads")
    make.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    started = time.monotonic()
    if args.command == "template":
        write_template(args.source, args.out)
    else:
        make_model(args.template, SHAPES[args.shape], args.out, args.threads, args.seed)
    size = args.out.stat().st_size
    print(f"{args.out}: {size / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
