"""The llama.cpp engine: serves the configured GGUF models to jobs, one llama.cpp context per slot.

Usage:

    engine = Engine([ModelConfig(Path("smollm2.gguf"), slots=2)])
    await engine.start()
    async for event in engine.generate(Job("chat/completions", {"model": "smollm2", "messages": [...]})):
        ...  # Text pieces, then one End; or one Result for embeddings
    await engine.close()

A job borrows a free slot (never waits for one) and runs llama.cpp on a worker thread, which hands events to the event
loop. The slot goes back when that thread is done with it, whether the job finished, failed, was cancelled through
`Job.cancel`, or its consumer walked away. Worker threads outlive their jobs, so that llama.cpp's OpenMP team is not
started anew before every first token (see `_Workers`). A job takes the free slot that holds the longest prefix of its
prompt, and evaluates the rest of its prompt in chunks that a cancel stops between (see agent.slots).

Generated text reaches the event loop in batches (`Job.batch_s`, `Job.batch_max`): the first piece at once, then
what accumulated, on a tick of the loop's own: a steady generation wakes the loop once per batch, and the worker thread
never, rather than once per token; on a machine whose cores llama.cpp keeps busy, every wake-up is taken from its
threads (see _Channel).

Errors (`code` travels to the plane):

    EngineError                      any failure of a job, before or during generation
    ├── ModelNotFound                model_not_found: no such model, or it failed to load
    ├── InvalidRequest               invalid_request: a body parameter is missing, malformed or unsupported
    │   └── UnsupportedEndpoint      unsupported_endpoint: e.g. chat on a model loaded for embeddings
    ├── NoChatTemplate               no_chat_template: chat asked of a model without a chat template
    ├── ContextLengthExceeded        context_length_exceeded: the prompt does not fit a slot's context
    ├── Busy                         busy: every slot of the model is taken
    └── GenerationFailed             generation_failed: llama.cpp itself failed mid-job
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jinja2
import numpy as np
import numpy.typing as npt
from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_NONE, Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent import sampling as sampler
from agent import tools
from agent.gpufit import GpuFit, resolve
from agent.grammar import PrefillRejected, check_prefix
from agent.models import ModelConfig
from agent.sampling import ChoiceEnd, Sampling, TokenLogprob
from agent.slots import Lease, Slots, keep_prefix, prefill
from agent.speed import Speed, SpeedMeter
from agent.tools import ToolCallDelta

logger = logging.getLogger(__name__)

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

# How long a worker thread that is not the last one to go idle waits for another job before it ends (see _Workers).
WORKER_LINGER_S = 5.0
# A batch whose deadline is this close is handed over rather than waited for: timers are not that precise.
_TIMER_SLACK_S = 0.001
# The longest generation waits for the first token to leave (Job.first_sent).
FIRST_HOLD_S = 0.02


class EngineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ModelNotFound(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("model_not_found", message)


class InvalidRequest(EngineError):
    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(code, message)


class UnsupportedEndpoint(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, "unsupported_endpoint")


class NoChatTemplate(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("no_chat_template", message)


class ContextLengthExceeded(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("context_length_exceeded", message)


class Busy(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("busy", message)


class GenerationFailed(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__("generation_failed", message)


@dataclass
class Job:
    """One request: `endpoint` is "chat/completions", "completions" or "embeddings"; `body` the OpenAI body.

    Setting `cancel` (from any thread) stops the job before the next token, or the next chunk of its prompt.

    Text is handed over in batches: the first piece at once; after that, what accumulated every `batch_s` seconds,
    or as soon as `batch_max` pieces wait. With the defaults every piece is its own Text.

    `first_sent`, when given, holds generation after the first piece until it is set (or FIRST_HOLD_S passed): the
    consumer sets it once the first text is on its way. llama.cpp's threads take every core they are given, and the
    first token would otherwise leave while the next one is computed, waiting for a core at each step of its way.
    """

    endpoint: str
    body: dict[str, Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    batch_s: float = 0.0
    batch_max: int = 1
    first_sent: threading.Event | None = None


@dataclass(frozen=True)
class Text:
    """Generated text: `pieces` is how many generated pieces (one per token) it joins; `logprobs` its tokens' log
    probabilities when the request asked for them; `choice` the choice it belongs to (n > 1)."""

    text: str
    pieces: int = 1
    logprobs: tuple[TokenLogprob, ...] = ()
    choice: int = 0
    # Tool-call fragments that follow the text (agent.tools), consecutive ones of a call merged.
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class End:
    """The last event of a generation job: finish_reason is "stop", "length", "cancelled", or "tool_calls" /
    "function_call" for an answer that calls tools (agent.tools).

    `cached_tokens`: of the prompt tokens, how many the slot already held and did not evaluate again (OpenAI's
    usage.prompt_tokens_details.cached_tokens).

    `choices`: each choice's end when the request asked for several (n > 1), `completion_tokens` their sum; empty
    for one choice."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    choices: tuple[ChoiceEnd, ...] = ()


@dataclass(frozen=True)
class Result:
    """The whole answer of a job that does not stream: the OpenAI embeddings response."""

    body: dict[str, Any]


Event = Text | End | Result


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


class Engine:
    """Serves `models`; see the module docstring. `issues` lists the models that could not be served."""

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


# --- slots and the worker's link to the event loop --------------------------------------------------------------

_Item = Text | End | Result | EngineError | None  # None: the worker thread is done
# text, its tokens' logprobs, its choice, tool-call fragments after it
_Piece = tuple[str, tuple[TokenLogprob, ...], int, tuple[ToolCallDelta, ...]]


class _Channel:
    """One job's link between its worker thread and the event loop: events for the consumer arrive on `queue`.

    The worker thread adds generated text with `text()` and ends with `send()`. Text is batched as `Job` describes:
    the first piece at once, later ones once the oldest waiting piece is `batch_s` old or `batch_max` pieces wait.
    After a hand-over the loop looks again on a timer of its own (a tick) when the next batch should be due: `batch_s`
    plus the lead its first piece had on the last batch (about one token). A steady generation thus wakes nothing
    across threads and the loop once per batch, with the batches it had when the worker woke the loop for each
    batch's first piece and the loop then set a timer for its deadline: that cost the worker a system call and the
    loop a second wake-up per batch (bench/results/node-path.md), each taken from llama.cpp's threads on a machine
    whose cores they keep busy. A piece that finds no tick pending (the first, or the first after a tick found
    nothing) wakes the loop, as does a full batch.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        cancel: threading.Event,
        batch_s: float = 0.0,
        batch_max: int = 1,
        first_sent: threading.Event | None = None,
    ) -> None:
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.cancel = cancel
        self.abandoned = threading.Event()
        self._loop = loop
        self._batch_s = max(0.0, batch_s)
        self._batch_max = max(1, batch_max)
        # A tick this close to a batch's deadline hands it over: a second wake-up for a few ms is not worth it.
        self._early_s = max(_TIMER_SLACK_S, self._batch_s / 10)
        self._first_sent = first_sent  # the worker's alone: cleared once waited for
        self._lock = threading.Lock()  # guards what the worker thread and the loop share: the three below
        self._pieces: list[_Piece] = []
        self._oldest = 0.0  # when the first of _pieces came (time.monotonic)
        self._due = False  # the loop will look at _pieces without being woken: a wake-up is queued or a tick set
        # The loop's alone, like _timer: when it last handed text over (None: not yet), how long after that the
        # first piece of the next batch came, and whether a tick found nothing since.
        self._handed_at: float | None = None
        self._lead = 0.0
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.abandoned.is_set()

    def text(
        self,
        piece: str,
        logprobs: tuple[TokenLogprob, ...] = (),
        choice: int = 0,
        tool_calls: tuple[ToolCallDelta, ...] = (),
    ) -> None:
        """From the worker thread: generated text, handed over with the batch it falls in."""
        with self._lock:
            if not self._pieces:
                self._oldest = time.monotonic()
            self._pieces.append((piece, logprobs, choice, tool_calls))
            wake = not self._due or len(self._pieces) == self._batch_max
            self._due = True
        if wake:
            self._call(self._look)
        if self._first_sent is not None:
            self._first_sent.wait(FIRST_HOLD_S)
            self._first_sent = None

    def send(self, item: _Item) -> None:
        """From the worker thread: the job's last events (its outcome, then None), after any text still waiting."""
        self._call(self._finish, item)

    def _look(self) -> None:
        """On the loop, woken by the worker or by a tick: hand the waiting pieces over if their batch is complete (and
        tick again when the next one should be), else look again at its deadline; without pieces, stop ticking."""
        self._stop_timer()
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            pieces, oldest = self._pieces, self._oldest
            if pieces and self._handed_at is not None and len(pieces) < self._batch_max:
                wait = oldest + self._batch_s - now
            if wait > self._early_s:
                pieces = []  # not due yet
            else:
                self._pieces = []
                wait = 0.0
            # Waiting pieces, or pieces handed over now (a steady generation): the next ones find a tick pending.
            # None (a pause, or the end coming): the next piece wakes the loop.
            self._due = tick = (wait > 0 or bool(pieces)) and self._batch_s > 0
        if pieces:
            # After a pause the first piece's lead on the last hand-over is the pause, not a token: start from none.
            last = None if self._paused else self._handed_at
            self._lead = 0.0 if last is None else min(max(oldest - last, 0.0), self._batch_s)
            self._handed_at, self._paused = now, False
            self._hand_over(pieces)
            wait = self._batch_s + self._lead
        elif not tick:
            self._paused = True
        if tick:
            self._timer = self._loop.call_later(wait, self._look)

    def _finish(self, item: _Item) -> None:
        self._stop_timer()
        with self._lock:
            pieces, self._pieces = self._pieces, []
            self._due = True  # nothing more is coming
        if pieces:
            self._hand_over(pieces)
        self.queue.put_nowait(item)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_over(self, pieces: list[_Piece]) -> None:
        # One Text per choice: the choices of `n` are generated one after another, so a batch spans two at most.
        for choice, run in itertools.groupby(pieces, key=lambda piece: piece[2]):
            texts, logprobs, _, calls = zip(*run, strict=True)
            # A choice's content all comes before its first call: the text, then the calls, keep their order.
            merged = tuple(tools.merge(sum(calls, ())))
            self.queue.put_nowait(Text("".join(texts), len(texts), sum(logprobs, ()), choice, merged))

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the loop closed under an abandoned job, and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)


_Task = Callable[[], Callable[[], None]]  # a job for a worker thread: returns the report of its end


class _Workers:
    """The threads that run jobs, shared by every slot of every model: a job borrows a slot's llama.cpp context and
    one of these threads.

    llama.cpp's CPU backend runs on OpenMP, whose worker team belongs to the thread that calls it. A thread that
    lives on keeps its team: a new thread per job also started a team at every first decode, some milliseconds
    before the first token. But every idle team still counts for libgomp: once teams hold more threads than there
    are CPUs, it stops spinning between steps and each decode gets several times slower. So a job runs on the thread
    that went idle last (a steady stream of jobs keeps reusing one), a thread starts only for a job that finds none
    idle, and an idle thread ends after `linger_s` unless it is the one that went idle last.
    """

    def __init__(self, name: str, linger_s: float = WORKER_LINGER_S) -> None:
        self._name = name
        self._linger_s = linger_s
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # the one that went idle last at the end
        self._all: set[_Worker] = set()
        self._started = 0
        self._closed = False

    def run(self, work: _Task) -> None:
        """Hand `work` to an idle thread, or to a new one; raises RuntimeError when no thread can start.

        `work` returns a report to make once the thread counts as idle again, so that whoever hears it and hands over
        the next job at once finds the thread idle rather than start another."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._idle:
                self._idle.pop().inbox.put(work)
                return
            self._started += 1
            worker = _Worker(self._serve, f"{self._name}-{self._started}")
            self._all.add(worker)
        worker.inbox.put(work)
        try:
            worker.thread.start()
        except RuntimeError:
            with self._lock:
                self._all.discard(worker)
            raise

    def close(self) -> None:
        """Let every thread finish the job it runs, if any, and end. Blocks."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
        for worker in workers:
            worker.inbox.put(None)
        for worker in workers:
            worker.thread.join()

    def _serve(self, worker: _Worker) -> None:
        work = worker.inbox.get()
        while work is not None:
            report = work()
            with self._lock:
                self._idle.append(worker)
            report()
            work = self._next(worker)

    def _next(self, worker: _Worker) -> _Task | None:
        while True:
            try:
                return worker.inbox.get(timeout=self._linger_s)
            except queue.Empty:
                with self._lock:
                    # Not idle any more: a job is on its way. Idle last: stay for the next job.
                    if worker in self._idle and self._idle[-1] is not worker:
                        self._idle.remove(worker)
                        self._all.discard(worker)
                        return None


class _Worker:
    def __init__(self, serve: Callable[[_Worker], None], name: str) -> None:
        self.inbox: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        # A daemon, so that an engine nobody closed does not keep the process alive; Engine.close ends it properly.
        self.thread = threading.Thread(target=serve, args=(self,), name=name, daemon=True)


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


# --- turning a request body into work for a slot ------------------------------------------------------------------

_Work = Callable[[Lease, _Channel], Event]


@dataclass
class _Model:
    config: ModelConfig
    slots: Slots
    formatter: Jinja2ChatFormatter | None
    size_bytes: int
    gpu: GpuFit | None = None

    def info(self) -> ModelInfo:
        config = self.config
        return ModelInfo(
            name=config.name,
            slots=config.slots,
            context=config.context,
            price_in=config.price_in,
            price_out=config.price_out,
            has_chat_template=self.formatter is not None,
            embeddings=config.embeddings,
            path=config.path,
            size_bytes=self.size_bytes,
            gpu=self.gpu,
        )

    def prepare(self, endpoint: str, body: Mapping[str, Any]) -> _Work:
        """Check the body and turn it into the work a slot runs; raises before any slot is taken."""
        name = self.config.name
        if endpoint == EMBEDDINGS:
            if not self.config.embeddings:
                raise UnsupportedEndpoint(f"model {name} is not loaded for embeddings")
            return functools.partial(_embed, inputs=_embedding_inputs(body), model=name, encoding=_encoding(body))
        if endpoint not in (CHAT, COMPLETIONS):
            raise UnsupportedEndpoint(f"unknown endpoint {endpoint!r}")
        if self.config.embeddings:
            raise UnsupportedEndpoint(f"model {name} is loaded for embeddings only")
        _reject_unsupported(endpoint, body)
        sampling = _sampling(endpoint, body)
        if endpoint == COMPLETIONS:
            return functools.partial(_complete, prompt=_completion_prompt(body), add_bos=True, sampling=sampling)
        if self.formatter is None:
            raise NoChatTemplate(f"model {name} has no chat template; use /v1/completions or configure one")
        plan = self._plan(body)
        prompt, template_stops = _render_chat(self.formatter, plan.messages, plan.tools)
        sampling = dataclasses.replace(sampling, stop=(*sampling.stop, *template_stops))
        # The template writes BOS itself where the model wants one, as llama-cpp-python's own chat handler assumes.
        return functools.partial(_complete, prompt=prompt, add_bos=False, sampling=sampling, output=plan.output)

    def _plan(self, body: Mapping[str, Any]) -> tools.ChatPlan:
        """Tools and response_format (agent.tools, agent.grammar): what the template renders, what the answer is
        held to. A prefilled answer under a grammar is checked here, before a slot is taken."""
        assert self.formatter is not None
        try:
            plan = tools.plan_chat(body, _messages(body), self.formatter.template)
            output = plan.output
            if output.prefill and output.grammar is not None:
                prefix = check_prefix(self.slots.tokenizer, output.grammar, output.prefill)
                plan = dataclasses.replace(plan, output=dataclasses.replace(output, prefill_tokens=prefix))
        except PrefillRejected as exc:
            raise InvalidRequest(f"the final assistant message does not fit the response_format: {exc}") from exc
        except ValueError as exc:  # ToolsError, UnsupportedSchema, ResponseFormatError
            raise InvalidRequest(str(exc)) from exc
        return plan


def _sampling(endpoint: str, body: Mapping[str, Any]) -> Sampling:
    try:
        return sampler.parse(endpoint, body, lambda: secrets.randbits(32))
    except sampler.InvalidParameter as exc:
        raise InvalidRequest(str(exc)) from exc


def _reject_unsupported(endpoint: str, body: Mapping[str, Any]) -> None:
    """Refuse what llama.cpp nodes cannot honour rather than answer something the client did not ask for (the
    sampling parameters: agent.sampling; tools and response_format on chat: agent.tools)."""
    if endpoint == COMPLETIONS and any(body.get(key) for key in ("tools", "functions", "response_format")):
        raise InvalidRequest("'tools', 'functions' and 'response_format' are chat parameters")


def _completion_prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(token, int) and not isinstance(token, bool) for token in prompt):
        return cast(list[int], prompt)
    raise InvalidRequest("'prompt' must be a string, a list of one string, or a list of token ids")


_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # the legacy functions' results
}
# What agent.tools reads of a message besides its role and content.
_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id", "name")


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{index}].role must be one of {', '.join(_ROLES)}")
        # Templates only know the classic roles; "developer" is OpenAI's new name for "system".
        entry = {"role": _ROLES[role], "content": _content(message.get("content"), index)}
        entry.update((key, message[key]) for key in _TOOL_KEYS if message.get(key) is not None)
        messages.append(entry)
    return messages


def _content(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(text, str) for text in texts):
            return "".join(cast(list[str], texts))
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of text parts")


def _render_chat(
    formatter: Jinja2ChatFormatter, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, tuple[str, ...]]:
    """The prompt for `messages` (and `tools`, for a template that renders them), and the template's stop strings.

    A final assistant message is a prefill: the messages before it are rendered with the generation prompt and its
    content is appended verbatim, so the model continues that text instead of starting a new turn.
    """
    prefill = ""
    if messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        messages = messages[:-1]
    try:
        rendered = formatter(messages=cast(Any, messages), tools=cast(Any, tools))
    except (ValueError, jinja2.TemplateError) as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc
    stop = rendered.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return rendered.prompt + prefill, stops


def _embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) and item for item in inputs):
        raise InvalidRequest("'input' must be a non-empty string or a list of non-empty strings")
    if body.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported")
    return cast(list[str], inputs)


def _encoding(body: Mapping[str, Any]) -> str:
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'")
    return str(encoding)


# --- the work itself, run in the job's worker thread ---------------------------------------------------------------


def _complete(
    lease: Lease,
    channel: _Channel,
    *,
    prompt: str | list[int],
    add_bos: bool,
    sampling: Sampling,
    output: tools.Output | None = None,
) -> End:
    tokens = _tokenize(lease.tokenizer, prompt, add_bos)
    context = lease.tokenizer.n_ctx()
    if not tokens:
        raise InvalidRequest("the prompt is empty")
    if len(tokens) >= context:
        raise ContextLengthExceeded(
            f"the prompt is {len(tokens)} tokens but a slot holds {context} tokens, completion included"
        )
    try:
        sampler.check_for_model(sampling, lease.tokenizer.n_vocab(), len(tokens), context)
    except sampler.InvalidParameter as exc:
        raise InvalidRequest(str(exc)) from exc
    if channel.should_stop():
        return End("cancelled", len(tokens), 0)
    llama = lease.take(tokens)
    text = prompt if isinstance(prompt, str) else None
    pieces = sampler.prompt_pieces(llama, tokens, text) if sampling.echo else []
    scored: list[TokenLogprob] | None = None
    if sampling.echo and sampling.logprobs is not None:
        # Scoring the prompt takes the logits of every position, which the slot's cache does not hold.
        cached = 0
        scored = sampler.score_prompt(llama, tokens, pieces, sampling.logprobs, channel.should_stop)
        if scored is None:
            return End("cancelled", len(tokens), 0)
    else:
        cached = keep_prefix(llama, tokens)
        # In chunks that a cancel stops between, all of it but the last token, which the generation evaluates to
        # sample the first token from.
        if not prefill(llama, tokens, channel.should_stop):
            return End("cancelled", len(tokens), 0, cached)
    echoed = text if text is not None else b"".join(pieces).decode("utf-8", errors="replace")
    ends: list[ChoiceEnd] = []
    for index in range(sampling.n):
        if index:
            keep_prefix(llama, tokens)  # back to the prompt, which the slot still holds but for its last token
        if sampling.echo:
            for piece, logprobs in sampler.echo_runs(echoed, scored):
                channel.text(piece, logprobs, index)
        ends.append(tools.run_choice(llama, tokens, sampling, index, channel.text, channel.should_stop, output))
        if ends[-1].finish_reason == "cancelled":
            break
    finish = "cancelled" if ends[-1].finish_reason == "cancelled" else ends[0].finish_reason
    completion = sum(end.completion_tokens for end in ends)
    return End(finish, len(tokens), completion, cached, tuple(ends) if sampling.n > 1 else ())


def _tokenize(llama: Llama, prompt: str | list[int], add_bos: bool) -> list[int]:
    if isinstance(prompt, str):
        # special=True: control tokens written in the prompt (a template's <|im_start|>) are tokens, not text.
        return llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    vocabulary = llama.n_vocab()
    if any(not 0 <= token < vocabulary for token in prompt):
        raise InvalidRequest(f"token ids must be between 0 and {vocabulary - 1}")
    return list(prompt)


def _embed(lease: Lease, channel: _Channel, *, inputs: list[str], model: str, encoding: str) -> Event:
    llama = lease.take(())  # embedding keeps no cache worth choosing a slot for
    limit = min(llama.n_ctx(), llama.n_batch)
    data: list[dict[str, Any]] = []
    total = 0
    for index, text in enumerate(inputs):
        if channel.should_stop():
            return End("cancelled", total, 0)
        count = len(llama.tokenize(text.encode("utf-8")))  # the tokens `embed` decodes
        if count > limit:
            raise ContextLengthExceeded(f"input[{index}] is {count} tokens but the model embeds at most {limit}")
        vector = np.asarray(llama.embed(text, truncate=False), dtype=np.float32)
        if vector.ndim == 2:
            vector = vector.mean(axis=0)  # the model pools nothing itself
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm  # unit length, as OpenAI's embeddings are
        total += count
        data.append({"object": "embedding", "index": index, "embedding": _encode_vector(vector, encoding)})
    usage = {"prompt_tokens": total, "total_tokens": total}
    return Result({"object": "list", "data": data, "model": model, "usage": usage})


def _encode_vector(vector: npt.NDArray[np.float32], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(value) for value in vector]
