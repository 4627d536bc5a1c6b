"""The `Engine`: loads the configured models and runs each job on a slot and a worker thread (see agent.engine)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import jinja2

from agent.engine.channel import _Channel
from agent.engine.errors import Busy, EngineError, GenerationFailed, InvalidRequest, ModelNotFound
from agent.engine.jobs import End, Event, Job, Text
from agent.engine.loading import Issue, ModelInfo, ModelStatus, _formatter, _open_slots, select_chat_template
from agent.engine.requests import _Model, _Work
from agent.engine.workers import _Workers
from agent.gpufit import resolve
from agent.models import ModelConfig
from agent.slots import Lease, Slots
from agent.speed import SpeedMeter

logger = logging.getLogger(__name__)


class Engine:
    """Serves `models`; see the package docstring (agent.engine). `issues` lists the models that could not be served."""

    def __init__(self, models: Sequence[ModelConfig]) -> None:
        self._configs = list(models)
        self._models: dict[str, _Model] = {}
        self._running: set[_Channel] = set()
        self._workers = _Workers("hatchway-llama")
        self.issues: list[Issue] = []
        self.speed = SpeedMeter()

    async def start(self) -> None:
        for config in self._configs:
            if config.name in self._models:
                self._report(
                    Issue("duplicate_model_name", f"another model is already served as {config.name}", config.name)
                )
                continue
            model = await self._load(config)
            if model is not None:
                self._models[config.name] = model

    async def close(self) -> None:
        """Stop every running job, wait for the worker threads to finish, then free the models."""
        for channel in list(self._running):
            channel.abandoned.set()
        await asyncio.to_thread(self._workers.close)
        for model in self._models.values():
            model.slots.close()
        self._models.clear()

    def status(self) -> list[ModelStatus]:
        return [
            ModelStatus(name, model.slots.total, model.slots.busy, self.speed.get(name))
            for name, model in self._models.items()
        ]

    def infos(self) -> list[ModelInfo]:
        return [model.info() for model in self._models.values()]

    async def generate(self, job: Job) -> AsyncGenerator[Event, None]:
        """Yield Text pieces then End (generation) or one Result (embeddings); raise EngineError on failure.

        A cancelled job ends with End(finish_reason="cancelled") and the token counts so far. Closing the generator
        early (`aclose`, or dropping it) stops the job too, and `aclose` returns once its slot is free again.
        """
        model = self._find(job.body)
        work = model.prepare(job.endpoint, job.body)
        channel = _Channel(asyncio.get_running_loop(), job.cancel, job.batch_s, job.batch_max, job.first_sent)
        if not model.slots.reserve():
            raise Busy(f"all {model.slots.total} slots of model {model.config.name} are busy")
        self._running.add(channel)
        try:
            self._workers.run(functools.partial(self._work, Lease(model.slots), work, channel))
        except RuntimeError:
            self._running.discard(channel)
            model.slots.release(None)
            raise
        finished = False
        # Speed is measured from the first generated text (an echoed prompt is not generated) to the End.
        first_at: float | None = None
        measure = not job.body.get("echo")
        try:
            while (item := await channel.queue.get()) is not None:
                if isinstance(item, EngineError):
                    raise item
                if measure and isinstance(item, Text) and first_at is None:
                    first_at = time.monotonic()
                elif measure and isinstance(item, End) and first_at is not None and item.finish_reason != "cancelled":
                    self.speed.record(model.config.name, item.completion_tokens, time.monotonic() - first_at)
                yield item
            finished = True
        finally:
            if not finished:
                # The consumer left (or we are raising): stop the thread and wait until it has let go of the slot,
                # so that the caller sees the slot free once this generator is closed.
                channel.abandoned.set()
                while await channel.queue.get() is not None:
                    pass

    def _work(self, lease: Lease, work: _Work, channel: _Channel) -> Callable[[], None]:
        """On a worker thread: run the job and give the slot back; returns the report of its end, which the thread
        sends once it is free for the next job too, so that a reported end means a free slot and a free thread."""
        outcome: Event | EngineError
        try:
            try:
                outcome = work(lease, channel)
            finally:
                lease.release()
        except EngineError as exc:
            outcome = exc
        except Exception as exc:
            logger.exception("llama.cpp failed on a job")
            outcome = GenerationFailed(f"llama.cpp failed: {exc}")
        self._running.discard(channel)
        return functools.partial(_report, channel, outcome)

    def _find(self, body: Mapping[str, Any]) -> _Model:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("'model' is required")
        model = self._models.get(name)
        if model is not None:
            return model
        reasons = [issue.message for issue in self.issues if issue.model == name]
        if reasons:
            raise ModelNotFound(f"model {name!r} is not available: {reasons[0]}")
        raise ModelNotFound(f"model {name!r} is not served by this node")

    async def _load(self, config: ModelConfig) -> _Model | None:
        if not config.path.is_file():
            self._report(Issue("model_file_missing", f"model file not found: {config.path}", config.name))
            return None
        try:
            gpu = await asyncio.to_thread(resolve, config)
            logger.info("model %s: %s", config.name, gpu.reason)
            llamas = await asyncio.to_thread(_open_slots, dataclasses.replace(config, gpu_layers=gpu.layers))
        except Exception as exc:
            self._report(Issue("load_failed", f"llama.cpp could not load {config.path}: {exc}", config.name))
            return None
        model = _Model(config, Slots(llamas), None, config.path.stat().st_size, gpu)
        if config.embeddings:
            return model
        template = select_chat_template(config.chat_template, llamas[0].metadata)
        if template is None:
            self._report(
                Issue(
                    "no_chat_template",
                    f"{config.path} has no chat template and none is configured: only /v1/completions is served",
                    config.name,
                )
            )
            return model
        try:
            model.formatter = _formatter(llamas[0], template)
        except jinja2.TemplateError as exc:
            self._report(Issue("invalid_chat_template", f"the chat template does not compile: {exc}", config.name))
        return model

    def _report(self, issue: Issue) -> None:
        logger.warning("model %s: %s", issue.model, issue.message)
        self.issues.append(issue)


def _report(channel: _Channel, outcome: Event | EngineError) -> None:
    channel.send(outcome)
    channel.send(None)
