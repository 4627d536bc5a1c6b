"""`--gpu-layers auto`: the GGUF metadata read from the demo model's real file, the layer fit against scripted NVML
readings, the choice in Hello and in `hatchway admin nodes show`. No GPU is needed: NVML is scripted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agent.cli import _gpu_layers, demo_model_path
from agent.config import AgentConfig
from agent.connection import Agent
from agent.engine import Engine
from agent.gpufit import (
    MARGIN_FIXED_BYTES,
    Backend,
    Gguf,
    GgufError,
    backend,
    fit,
    margin_bytes,
    read_gguf,
    resolve,
)
from agent.hardware import Gpu
from agent.models import AUTO, ModelConfig
from proto.hatchway.node.v1 import node_pb2 as pb
from server.cli import cli
from tests.conftest import ADMIN_KEY, Gateway
from tests.support.hostile_agent import HostileAgent, hello, model
from tests.support.loop_thread import LoopThread

GIB = 1 << 30
CUDA = Backend("cuda", True)


@pytest.fixture(scope="module")
def demo() -> Gguf:
    return read_gguf(demo_model_path())


def gpu(free: int, total: int = 4 * GIB, index: int = 0) -> Gpu:
    return Gpu(index, "Scripted GPU", total, free, 0.0, "555.0")


def layers_cost(demo: Gguf, layers: int, slots: int = 1, context: int = 2048) -> int:
    """What the last `layers` repeating layers cost, with the compute buffers, for `slots` contexts."""
    kv = demo.kv_bytes_per_layer(context)
    weights = sum(demo.layer_bytes[len(demo.layer_bytes) - layers :])
    return slots * (demo.compute_bytes(context) + weights + layers * kv)


def test_the_demo_models_metadata_is_read_from_its_gguf_header(demo: Gguf) -> None:
    # SmolLM2-135M: 30 llama blocks of 576 wide, 9 query heads sharing 3 KV heads, 49,152 tokens.
    assert (demo.version, demo.architecture, demo.block_count) == (3, "llama", 30)
    assert demo.arch_int("embedding_length") == 576
    assert (demo.arch_int("attention.head_count"), demo.arch_int("attention.head_count_kv")) == (9, 3)
    assert demo.arch_int("context_length") == 8192
    assert demo.vocab_size == 49152
    # f16 K and V of 3 heads x 64 wide per token, 2,048 tokens: 1.5 MiB a layer.
    assert demo.kv_bytes_per_layer(2048) == 2 * 2048 * 3 * 64 * 2


def test_tensor_sizes_add_up_to_the_files_tensor_data(demo: Gguf) -> None:
    assert demo.tensor_bytes == demo.file_bytes - demo.data_offset
    layers = demo.layer_bytes
    assert len(layers) == 30 and len(set(layers)) == 1  # identical blocks
    # About 2 MiB of weights each; the rest is the token embedding, tied to the output (so it is the output
    # layer's matrix too), and the output norm.
    assert 1_500_000 < layers[0] < 3_000_000
    assert sum(layers) + demo.output_bytes == demo.tensor_bytes


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(GgufError, match="bad magic"):
        read_gguf(other)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(demo_model_path().read_bytes()[:200])
    with pytest.raises(GgufError):
        read_gguf(truncated)


def test_ample_free_vram_takes_every_layer_and_the_output(demo: Gguf) -> None:
    result = fit(demo, slots=1, context=2048, gpu=gpu(free=3 * GIB))
    assert (result.layers, result.offloaded, result.total_layers) == (-1, 31, 31)
    assert result.bytes_needed == layers_cost(demo, 30) + demo.output_bytes
    assert result.bytes_free == 3 * GIB and "all 31 layers" in result.reason and "GPU 0" in result.reason


def test_scarce_free_vram_takes_the_layers_that_fit(demo: Gguf) -> None:
    card = gpu(free=0, total=GIB)
    free = margin_bytes(card) + layers_cost(demo, 12) + 1000  # room for 12 layers, not 13
    result = fit(demo, slots=1, context=2048, gpu=gpu(free=free, total=GIB))
    assert (result.layers, result.offloaded, result.total_layers) == (12, 12, 31)
    assert result.bytes_needed == layers_cost(demo, 12)
    assert "12 of 31 layers" in result.reason


def test_free_vram_within_the_margin_takes_no_layer(demo: Gguf) -> None:
    card = gpu(free=0, total=GIB)
    free = margin_bytes(card) + layers_cost(demo, 1) - 1  # one byte short of one layer
    result = fit(demo, slots=1, context=2048, gpu=gpu(free=free, total=GIB))
    assert (result.layers, result.offloaded, result.bytes_needed) == (0, 0, 0)
    assert "holds no layer" in result.reason


def test_the_margin_is_a_tenth_of_the_card_and_256_mib(demo: Gguf) -> None:
    assert margin_bytes(gpu(free=GIB, total=10 * GIB)) == GIB + MARGIN_FIXED_BYTES
    for free in (300 << 20, 600 << 20, 900 << 20, 2 * GIB):
        card = gpu(free=free, total=2 * GIB)
        result = fit(demo, slots=1, context=2048, gpu=card)
        assert result.offloaded == 0 or result.bytes_needed + margin_bytes(card) <= free
    assert fit(demo, slots=1, context=2048, gpu=gpu(free=2 * GIB, total=2 * GIB)).offloaded == 31


def test_each_slot_holds_its_own_copy_of_the_offloaded_layers(demo: Gguf) -> None:
    card = gpu(free=0, total=GIB)
    # All of them once, and a second compute buffer.
    free = margin_bytes(card) + layers_cost(demo, 30) + demo.output_bytes + demo.compute_bytes(2048)
    assert fit(demo, slots=1, context=2048, gpu=gpu(free, GIB)).offloaded == 31
    two = fit(demo, slots=2, context=2048, gpu=gpu(free, GIB))
    assert 0 < two.offloaded < 31 and two.bytes_needed <= free - margin_bytes(card)


def test_auto_is_zero_layers_without_a_gpu() -> None:
    config = ModelConfig(path=demo_model_path())
    assert config.gpu_layers == AUTO
    # This machine, as it is: a CPU build of llama.cpp, no NVIDIA GPU.
    here = resolve(config)
    assert (here.layers, here.offloaded, here.total_layers) == (0, 0, 31)
    # A build that could offload, but NVML sees no GPU.
    none = resolve(config, build=CUDA, gpus=lambda: ([], "no NVIDIA driver"))
    assert (none.layers, none.offloaded) == (0, 0) and "no NVIDIA driver" in none.reason
    # A GPU, but a CPU-only build.
    cpu = resolve(config, build=Backend("cpu", False), gpus=lambda: ([gpu(3 * GIB)], "ok"))
    assert (cpu.layers, cpu.offloaded) == (0, 0) and "cannot offload" in cpu.reason


def test_auto_with_a_gpu_fits_against_the_first_visible_one(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig(path=demo_model_path())
    cards = [gpu(free=100 << 20, index=0), gpu(free=3 * GIB, index=1)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve(config, build=CUDA, gpus=lambda: (cards, "ok")).offloaded == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    chosen = resolve(config, build=CUDA, gpus=lambda: (cards, "ok"))
    assert (chosen.layers, chosen.offloaded, chosen.gpu) == (-1, 31, "GPU 1 (Scripted GPU)")
    assert chosen.reason.startswith("auto: all 31 layers")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "no GPU memory reading" in resolve(config, build=CUDA, gpus=lambda: (cards, "ok")).reason


def test_an_explicit_number_of_layers_is_kept() -> None:
    config = ModelConfig(path=demo_model_path(), gpu_layers=10)
    kept = resolve(config, build=CUDA, gpus=lambda: ([gpu(free=0)], "ok"))
    assert (kept.layers, kept.offloaded, kept.reason) == (10, 10, "set to 10")
    every = resolve(ModelConfig(path=demo_model_path(), gpu_layers=-1), build=CUDA)
    assert (every.layers, every.offloaded) == (-1, 31)


def test_gpu_layers_accepts_auto_or_a_number() -> None:
    path = demo_model_path()
    assert ModelConfig.from_dict({"path": str(path), "gpu_layers": "auto"}).gpu_layers == AUTO
    assert ModelConfig.from_dict({"path": str(path), "gpu_layers": 99}).gpu_layers == 99
    assert ModelConfig.from_dict(ModelConfig(path=path).to_dict()).gpu_layers == AUTO
    for bad in ("lots", -2, True, 1.5):
        with pytest.raises(ValueError, match="gpu_layers must be"):
            ModelConfig(path=path, gpu_layers=bad)
    assert (_gpu_layers("AUTO"), _gpu_layers("12"), _gpu_layers("-1")) == (AUTO, 12, -1)
    for bad_flag in ("lots", "-2"):
        with pytest.raises(click.BadParameter):
            _gpu_layers(bad_flag)


def test_hello_carries_the_backend_and_the_layers_chosen() -> None:
    async def greeting() -> pb.Hello:
        engine = Engine([ModelConfig(path=demo_model_path(), name="demo")])
        await engine.start()
        try:
            return Agent(AgentConfig(), engine)._hello()
        finally:
            await engine.close()

    sent = asyncio.run(greeting())
    assert (sent.backend, sent.gpu_offload) == (backend().name, backend().offload) == ("cpu", False)
    (info,) = sent.models
    assert (info.gpu_layers, info.layers_total) == (0, 31)
    assert info.gpu_layers_reason == "auto: this llama.cpp build (cpu) cannot offload"


@pytest.fixture
def node(gateway: Gateway) -> Iterator[tuple[Gateway, str]]:
    """A node of org acme that says it runs CUDA with 20 of 31 layers offloaded."""
    plane = gateway.plane
    token = plane.admin.post("/node-tokens", {"org": "acme"})["token"]
    loop = LoopThread(timeout_s=60)
    agent = HostileAgent(f"127.0.0.1:{plane.server.plane.grpc_port}", token)
    node_id = loop.run(agent.enroll()).node_id
    info = model("llama-3b", gpu_layers=20, layers_total=31, gpu_layers_reason="auto: 20 of 31 layers fit")
    session = loop.run(agent.connect(hello([info], backend="cuda", gpu_offload=True)))
    yield gateway, node_id
    loop.run(session.close())
    loop.close()


def test_admin_nodes_show_reports_the_backend_and_layers(node: tuple[Gateway, str]) -> None:
    gateway, node_id = node
    flags = ["admin", "--url", gateway.plane.url, "--admin-key", ADMIN_KEY]
    shown = json.loads(CliRunner().invoke(cli, [*flags, "--json", "nodes", "show", node_id]).output)
    assert (shown["backend"], shown["gpu_offload"]) == ("cuda", True)
    (entry,) = shown["models"]
    assert (entry["gpu_layers"], entry["layers_total"]) == (20, 31)
    assert entry["gpu_layers_reason"] == "auto: 20 of 31 layers fit"
    table = CliRunner().invoke(cli, [*flags, "nodes", "show", node_id]).output
    assert "cuda" in table and "llama-3b: gpu layers auto: 20 of 31 layers fit" in table


def test_status_prints_the_backend_and_the_layers_run_would_offload(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    AgentConfig(models=(ModelConfig(path=demo_model_path(), name="demo"),)).save(config)
    from agent.cli import cli as agent_cli

    result = CliRunner().invoke(agent_cli, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["backend"] == {"name": "cpu", "gpu_offload": False}
    (entry,) = doc["models"]
    assert entry["gpu_layers"] == AUTO
    assert entry["gpu_layers_now"] == {
        "offloaded": 0,
        "total": 31,
        "reason": "auto: this llama.cpp build (cpu) cannot offload",
    }
