"""What a node may send the plane: every field of EnrollRequest, Hello and Status against a documented bound.

A node is a machine someone else runs, with a credential that stays valid across restarts. The plane schedules,
loops over, stores, logs and bills what nodes report, so each number and string that reaches one of those is
checked here before anything else sees it:

- capacity (models, slots, context, prices, model names): what the plane schedules and bills by. A value outside
  its bound refuses the session: a Hello is answered, and a Status ends the session, with INVALID_ARGUMENT (a value
  out of range) or RESOURCE_EXHAUSTED (too many of something), the message naming the field and the bound;
- description (hardware, GPUs, issues, agent version, backend, GPU layers): only shown to admins. Clamped in
  place: strings cut to their bound, lists to their first entries, non-finite numbers set to 0, so a legitimate
  agent with a long llama.cpp error message is not refused for it;
- rates: Status and Heartbeat messages share a token bucket; a node over it has its session closed;
- jobs: the events a node sends for one job are bounded in number waiting to be read and in bytes over the job
  (server.nodes.registry enforces both; a node over either has its session closed and the job fails over); the
  strings and logprobs in them that reach the client are clamped (`clamp_job_event`).

Every bound is far above what the real agent sends, so only a broken or hostile agent meets one.

    ProtocolViolation   a node broke a bound: the session ends with `code` and the message
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from proto.contract import node_name_problem
from proto.hatchway.node.v1 import node_pb2 as pb

# -- capacity: refused ------------------------------------------------------------------------------

# Models one node serves. Each is a llama.cpp instance (or several) in the node's memory: 64 is far beyond one
# machine, and every per-node loop in the plane (slot wake-ups, listings, routing) goes over at most this many.
MAX_MODELS = 64
# Parallel requests per model. Each slot is a llama.cpp instance or a parallel sequence; a GPU box runs tens.
# The plane's own loops never depend on it (wake-ups go by queued requests), but 256 keeps routing sane.
MAX_SLOTS = 256
# Context per slot, in tokens: 2^20 is above every open model's context window today.
MAX_CONTEXT = 1 << 20
# A model name clients ask for; OpenAI's and Hugging Face's longest are well under 128.
MAX_MODEL_NAME_BYTES = 256
# USD per 1M tokens: a finite, non-negative price. $1,000,000 per 1M tokens is a dollar a token, far above any
# model's list price; beyond it the number is a mistake or an attack on billing.
MAX_PRICE = 1e6
# Measured generation speed (Status.models[].tokens_per_s): clamped into 0..MAX_TOKENS_PER_S, as it only orders
# nodes; no machine generates a million tokens a second for one job.
MAX_TOKENS_PER_S = 1e6

# -- description: clamped ---------------------------------------------------------------------------

# Hardware strings (hostname, OS, CPU model, GPU name and driver, NVML status) and the agent version: a
# hostname is at most 253 characters, the others much shorter.
MAX_TEXT_BYTES = 256
# Typed issues (a missing model file, a model without a chat template...): one per model and kind is plenty.
MAX_ISSUES = 64
# An issue's message can carry an exception's text from llama.cpp: 1 KiB keeps its gist.
MAX_ISSUE_MESSAGE_BYTES = 1024
# GPUs in one machine: 8 in the largest common servers, 16 in a few.
MAX_GPUS = 64
# A model's layers (ModelInfo.gpu_layers, layers_total): the deepest open models have a few hundred.
MAX_LAYERS = 4096

# -- enrollment: refused ----------------------------------------------------------------------------

# The token and the previous credential are `prefix-` plus 43 characters of base64; anything much longer is not one.
MAX_SECRET_BYTES = 256
# The agent sends 32 hex characters; stored with the node.
MAX_MACHINE_ID_BYTES = 128

# -- rates: the session is closed -------------------------------------------------------------------

# Status and Heartbeat messages, together. The real agent sends a heartbeat every few seconds and a Status when
# something changes (twice per job: its first tokens, its end); 200 a second on average allows 100 jobs a second
# on one node, and each costs the plane at most MAX_MODELS steps. A burst of 1,000 absorbs a reconnect's backlog.
STATUS_RATE_PER_S = 200.0
STATUS_BURST = 1000

# -- job events: the session is closed --------------------------------------------------------------

# Events of one job waiting for the plane to read them. The plane reads as fast as the client takes them, and the
# agent sends a batch every 50 ms at most: 4,096 is minutes of a client that stopped reading (the plane's own
# timeouts end such a request first), or a node flooding.
MAX_QUEUED_EVENTS_PER_JOB = 4096
# Bytes of one job's events over its whole life (text batches with their logprobs, a whole result for embeddings;
# the agent refuses a request whose logprobs could pass 3/4 of it: agent.sampling.LOGPROB_BUDGET_BYTES), which a
# non-streamed answer holds in memory: 2^20 tokens of context at 16 bytes per token, twice over. One event is
# bounded by the gRPC message cap (proto.contract.NODE_MESSAGE_MAX_BYTES).
MAX_JOB_BYTES = 32 * 1024 * 1024
# A JobError's code and message reach the client and the log.
MAX_ERROR_CODE_BYTES = 64
MAX_ERROR_MESSAGE_BYTES = 1024
# "stop", "length", "cancelled": anything longer is not a finish reason.
MAX_FINISH_REASON_BYTES = 32
# Logprobs (TokenBatch.logprobs) reach the client: alternatives per token, as many as OpenAI's `top_logprobs`
# allows; a token's bytes, far above the longest token of any vocabulary (a few dozen bytes). Cut to these; the
# number of entries is bounded by the batch's bytes like its text. A log probability that is not a finite number
# at most 0 is set to the nearest one (NaN: LOGPROB_FLOOR, OpenAI's figure for "never").
MAX_TOP_LOGPROBS = 20
MAX_TOKEN_BYTES = 256
LOGPROB_FLOOR = -9999.0
# Per-choice ends (JobEnd.choices): one per choice, and OpenAI's `n` is at most 128.
MAX_CHOICE_ENDS = 128

# -- logs -------------------------------------------------------------------------------------------

# Node-chosen strings in one log line: each cut to this many characters, control characters escaped.
LOG_CHARS = 64
# Model names listed in the "connected" line; the rest are counted.
LOG_MODELS = 3


class ProtocolViolation(Exception):
    """A node sent something outside the bounds: its session ends with `code`, and `message` says what."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refuse(field: str, problem: str) -> ProtocolViolation:
    return ProtocolViolation(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def _too_many(field: str, count: int, bound: int) -> ProtocolViolation:
    return ProtocolViolation(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {count} entries, at most {bound}")


def _utf8_len(text: str, bound: int) -> int:
    """The UTF-8 length of `text`, or a number above `bound` without encoding a huge string twice."""
    return len(text) if len(text) > bound else len(text.encode())


def _check_bytes(field: str, text: str, bound: int, *, empty: bool = False) -> None:
    if not text and not empty:
        raise _refuse(field, "must not be empty")
    size = _utf8_len(text, bound)
    if size > bound:
        raise _refuse(field, f"{size} bytes, at most {bound}")


def clip(text: str, bound: int) -> str:
    """`text` cut to at most `bound` UTF-8 bytes, on a character boundary."""
    if _utf8_len(text, bound) <= bound:
        return text
    return text[:bound].encode()[:bound].decode(errors="ignore")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def clamp_speed(tokens_per_s: float) -> float:
    """A measured speed into 0..MAX_TOKENS_PER_S; anything not finite reads 0 (not measured)."""
    return min(max(_finite(tokens_per_s), 0.0), MAX_TOKENS_PER_S)


# -- enrollment -------------------------------------------------------------------------------------


def check_enroll(request: pb.EnrollRequest) -> str:
    """The name to enroll `request` under; raises ProtocolViolation when a field is out of bounds."""
    _check_bytes("EnrollRequest.token", request.token, MAX_SECRET_BYTES)
    _check_bytes("EnrollRequest.previous_credential", request.previous_credential, MAX_SECRET_BYTES, empty=True)
    _check_bytes("EnrollRequest.machine_id", request.machine_id, MAX_MACHINE_ID_BYTES)
    field = "EnrollRequest.name" if request.name else "EnrollRequest.hardware.hostname"
    name = request.name or request.hardware.hostname
    problem = node_name_problem(name)
    if problem:
        hint = "" if request.name else " (the hostname stands for a missing name: pass --name)"
        raise _refuse(field, problem + hint)
    return name


# -- Hello and Status -------------------------------------------------------------------------------


def check_hello(hello: pb.Hello) -> None:
    """Refuse a Hello whose capacity is out of bounds; clamp its description in place."""
    if len(hello.models) > MAX_MODELS:
        raise _too_many("Hello.models", len(hello.models), MAX_MODELS)
    seen: set[str] = set()
    for i, model in enumerate(hello.models):
        field = f"Hello.models[{i}]"
        _check_bytes(f"{field}.name", model.name, MAX_MODEL_NAME_BYTES)
        if model.name in seen:
            raise _refuse(f"{field}.name", f"{loggable(model.name)!r} is listed twice")
        seen.add(model.name)
        _check_at_most(f"{field}.slots", model.slots, MAX_SLOTS)
        _check_at_most(f"{field}.context_per_slot", model.context_per_slot, MAX_CONTEXT)
        if model.has_price:
            for name, price in (("price_in", model.price_in), ("price_out", model.price_out)):
                if not (math.isfinite(price) and 0.0 <= price <= MAX_PRICE):
                    raise _refuse(f"{field}.{name}", f"{price!r} is not a price from 0 to {MAX_PRICE:g} USD per 1M")
        model.layers_total = min(model.layers_total, MAX_LAYERS)
        model.gpu_layers = min(model.gpu_layers, model.layers_total)
        model.gpu_layers_reason = clip(model.gpu_layers_reason, MAX_ISSUE_MESSAGE_BYTES)
    hello.agent_version = clip(hello.agent_version, MAX_TEXT_BYTES)
    hello.backend = clip(hello.backend, MAX_TEXT_BYTES)
    hello.os = clip(hello.os, MAX_TEXT_BYTES)
    _clamp_hardware(hello.hardware)
    _clamp_issues(hello.issues)


def check_status(status: pb.Status) -> None:
    """Refuse a Status whose capacity is out of bounds; clamp its description in place."""
    if len(status.models) > MAX_MODELS:
        raise _too_many("Status.models", len(status.models), MAX_MODELS)
    for i, load in enumerate(status.models):
        field = f"Status.models[{i}]"
        _check_bytes(f"{field}.name", load.name, MAX_MODEL_NAME_BYTES)
        _check_at_most(f"{field}.slots_total", load.slots_total, MAX_SLOTS)
        _check_at_most(f"{field}.slots_busy", load.slots_busy, MAX_SLOTS)
        load.tokens_per_s = clamp_speed(load.tokens_per_s)
        if load.tokens_per_s == 0.0:
            load.jobs_measured = 0  # a speed of 0 (or none at all) is no measurement
    status.cpu_percent = _finite(status.cpu_percent)
    _clamp_gpus(status.gpus)
    _clamp_issues(status.issues)


def _check_at_most(field: str, value: int, bound: int) -> None:
    if value > bound:
        raise _refuse(field, f"{value}, at most {bound}")


def _clamp_hardware(hardware: pb.Hardware) -> None:
    for name in ("hostname", "os", "cpu_model", "nvml_status"):
        setattr(hardware, name, clip(getattr(hardware, name), MAX_TEXT_BYTES))
    _clamp_gpus(hardware.gpus)


def _clamp_gpus(gpus: Any) -> None:
    del gpus[MAX_GPUS:]
    for gpu in gpus:
        gpu.name = clip(gpu.name, MAX_TEXT_BYTES)
        gpu.driver = clip(gpu.driver, MAX_TEXT_BYTES)
        gpu.utilization_percent = _finite(gpu.utilization_percent)


def _clamp_issues(issues: Any) -> None:
    del issues[MAX_ISSUES:]
    for issue in issues:
        issue.code = clip(issue.code, MAX_TEXT_BYTES)
        issue.model = clip(issue.model, MAX_MODEL_NAME_BYTES)
        issue.message = clip(issue.message, MAX_ISSUE_MESSAGE_BYTES)


def clamp_job_event(event: pb.JobEvent) -> None:
    """Cut the strings of a job's end or error that reach the client and the log, and a batch's logprobs."""
    kind = event.WhichOneof("kind")
    if kind == "tokens":
        if event.tokens.logprobs:  # only when the request asked for them: the common batch costs one test
            _clamp_logprobs(event.tokens.logprobs)
    elif kind == "error":
        event.error.code = clip(event.error.code, MAX_ERROR_CODE_BYTES)
        event.error.message = clip(event.error.message, MAX_ERROR_MESSAGE_BYTES)
    elif kind == "end":
        event.end.finish_reason = clip(event.end.finish_reason, MAX_FINISH_REASON_BYTES)
        del event.end.choices[MAX_CHOICE_ENDS:]
        for choice in event.end.choices:
            choice.finish_reason = clip(choice.finish_reason, MAX_FINISH_REASON_BYTES)


def _clamp_logprobs(entries: Any) -> None:
    for entry in entries:
        if len(entry.token) > MAX_TOKEN_BYTES:
            entry.token = entry.token[:MAX_TOKEN_BYTES]
        if entry.HasField("logprob"):
            entry.logprob = _logprob(entry.logprob)
        del entry.top[MAX_TOP_LOGPROBS:]
        for top in entry.top:
            if len(top.token) > MAX_TOKEN_BYTES:
                top.token = top.token[:MAX_TOKEN_BYTES]
            top.logprob = _logprob(top.logprob)


def _logprob(value: float) -> float:
    if math.isnan(value):
        return LOGPROB_FLOOR
    return min(max(value, LOGPROB_FLOOR), 0.0)


# -- rates ------------------------------------------------------------------------------------------


class MessageRate:
    """A token bucket: `rate_per_s` messages a second on average, `burst` at once.

    Parameters: `rate_per_s`, `burst`, and `clock` (tests pass their own).
    """

    def __init__(
        self,
        rate_per_s: float = STATUS_RATE_PER_S,
        burst: int = STATUS_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self._level = float(burst)
        self._stamp = clock()

    def allow(self) -> bool:
        """Spend one message; False when the bucket is empty (the message is over the rate)."""
        now = self.clock()
        self._level = min(float(self.burst), self._level + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        if self._level < 1.0:
            return False
        self._level -= 1.0
        return True


def over_rate() -> ProtocolViolation:
    return ProtocolViolation(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"Status and Heartbeat messages: more than {STATUS_RATE_PER_S:g} a second on average "
        f"(bursts of {STATUS_BURST})",
    )


# -- logs -------------------------------------------------------------------------------------------


def loggable(text: str, limit: int = LOG_CHARS) -> str:
    """`text` fit for a log line: at most `limit` characters of it, control characters escaped as repr does."""
    shown = repr(text[:limit])[1:-1]
    return shown if len(text) <= limit else f"{shown}...(+{len(text) - limit} chars)"


def model_list(names: Sequence[str] | Iterable[str]) -> str:
    """The first few model names for a log line, each cut, and how many more there are."""
    listed = list(names)
    shown = ", ".join(loggable(n) for n in listed[:LOG_MODELS])
    more = len(listed) - LOG_MODELS
    return (shown or "no model") + (f" and {more} more" if more > 0 else "")
