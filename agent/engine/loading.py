"""A model's slots: its llama.cpp contexts opened from the GGUF, its chat template, and what the engine reports of
the models it serves (`ModelStatus`, `ModelInfo`, `Issue`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_NONE, Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.gpufit import GpuFit
from agent.models import ModelConfig
from agent.speed import Speed


@dataclass(frozen=True)
class ModelStatus:
    name: str
    slots_total: int
    slots_busy: int
    # Generation speed measured on this node's jobs (agent.speed); None until one was measured.
    speed: Speed | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    slots: int
    context: int
    price_in: float | None
    price_out: float | None
    has_chat_template: bool
    embeddings: bool
    path: Path
    size_bytes: int
    # Where its layers went (agent.gpufit): offloaded of total layers, and why.
    gpu: GpuFit | None = None


@dataclass(frozen=True)
class Issue:
    """Something wrong with a configured model, for the operator: model_file_missing, load_failed, ..."""

    code: str
    message: str
    model: str


def select_chat_template(override: str | None, metadata: Mapping[str, str]) -> str | None:
    """The configured template wins over the GGUF's; None means the model cannot chat."""
    if override is not None:
        return override
    return metadata.get("tokenizer.chat_template") or None


def _open_slots(config: ModelConfig) -> list[Llama]:
    llamas: list[Llama] = []
    try:
        pooling: int | None = None
        if config.embeddings:
            probe = _open_llama(config, None)
            if int(probe.pooling_type()) == LLAMA_POOLING_TYPE_NONE:
                # A generative model declares no pooling and would return one vector per token: average them.
                probe.close()
                pooling = LLAMA_POOLING_TYPE_MEAN
            else:
                llamas.append(probe)
        while len(llamas) < config.slots:
            llamas.append(_open_llama(config, pooling))
    except BaseException:
        for llama in llamas:
            llama.close()
        raise
    return llamas


def _open_llama(config: ModelConfig, pooling: int | None) -> Llama:
    options: dict[str, Any] = {}
    if config.threads is not None:
        options.update(n_threads=config.threads, n_threads_batch=config.threads)
    if config.embeddings:
        # A whole input is decoded in one batch, so the batch must hold as much as the context.
        options.update(n_batch=config.context, n_ubatch=config.context)
        if pooling is not None:
            options.update(pooling_type=pooling)
    return Llama(
        model_path=str(config.path),
        n_ctx=config.context,
        n_gpu_layers=int(config.gpu_layers),  # resolved by agent.gpufit before the slots open
        embedding=config.embeddings,
        verbose=False,
        **options,
    )


def _formatter(llama: Llama, template: str) -> Jinja2ChatFormatter:
    def token_text(token: int) -> str:
        return llama.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llama.token_eos()),
        bos_token=token_text(llama.token_bos()),
        add_generation_prompt=True,
    )
