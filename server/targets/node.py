"""Node pools as targets: the connected nodes of an org that serve a model, behind one Target.

The pool claims a slot on one node per attempt (`NodeRegistry.dispatch`) and turns the node's token batches
back into OpenAI objects: `chat.completion.chunk` / `text_completion` SSE payloads for streams, whole bodies
otherwise, so the relay treats a node exactly like a provider. Each batch belongs to one of the request's `n`
choices and carries its tokens' logprobs when the request asked for them (server.targets.node_logprobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import orjson

from proto.hatchway.node.v1 import node_pb2 as pb
from server.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from server.nodes.bounds import MAX_PRICE
from server.nodes.registry import Job, NodeRegistry, SessionLost
from server.routing.continuation import ContinuationForm
from server.routing.failover import FailoverPolicy
from server.targets.base import Attempt, Call, Target, TargetStream
from server.targets.node_logprobs import ChoiceLogprobs, first_offset, requested
from server.usage.metering import Generated, choices

# The id routing rules use for "the org's nodes" (e.g. `route set m --targets nodes,openai`).
NODES_TARGET = "nodes"


def pool_key(org_id: str, model: str) -> str:
    """The key of an org's node pool for one model in the plane's health records (server.routing.health)."""
    return f"{NODES_TARGET}/{org_id}/{model}"


class NodePoolTarget(Target):
    kind = "node"
    id = NODES_TARGET
    # The agent renders the chat template itself, without the generation prompt, and appends the delivered text.
    continuation: ContinuationForm = "exact"

    def __init__(self, registry: NodeRegistry, org_id: str, model: str, policy: FailoverPolicy) -> None:
        self.registry = registry
        self.org_id = org_id
        self.upstream_model = model
        self.key = pool_key(org_id, model)
        self.policy = policy

    def __repr__(self) -> str:
        return f"NodePoolTarget({self.org_id!r}, {self.upstream_model!r})"

    # The cheapest node's price stands for the pool when routing by price; each attempt is billed at the
    # price of the node that served it.
    @property
    def price_in(self) -> float | None:  # type: ignore[override]
        return _cheapest(p[0] for p in self.registry.prices(self.org_id, self.upstream_model))

    @property
    def price_out(self) -> float | None:  # type: ignore[override]
        return _cheapest(p[1] for p in self.registry.prices(self.org_id, self.upstream_model))

    def has_capacity(self) -> bool:
        return self.registry.has_capacity(self.org_id, self.upstream_model)

    @property
    def tokens_per_s(self) -> float | None:
        """The speed its nodes measured (server.routing.rules's `fastest` uses it until health has measured the
        pool)."""
        return self.registry.tokens_per_s(self.org_id, self.upstream_model)

    async def _dispatch(self, call: Call, attempt: Attempt) -> Job:
        body = orjson.dumps({**call.body, "model": self.upstream_model})
        job = await self.registry.dispatch(
            self.org_id, self.upstream_model, call.endpoint, body, _affinity(self.org_id, call.body)
        )
        slots = job.session.models[self.upstream_model]
        attempt.route = job.session.node_id
        attempt.price = (bounded_price(slots.price_in), bounded_price(slots.price_out))
        attempt.context = slots.context or None
        attempt.generated = functools.partial(self._generated, job)
        return job

    async def _generated(self, job: Job) -> Generated:
        """The node's own count of a job the plane stopped reading: its JobEnd (an agent sends one when it stops
        for a cancel) once the slot is released, which the registry does within its cancel timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.registry.cancel_timeout_s + 1):
                await job.over.wait()
        return Generated(_usage(job.end) if job.end is not None else None, job.text_bytes)

    async def complete(self, call: Call, attempt: Attempt) -> bytes:
        job = await self._dispatch(call, attempt)
        answer = _Answer(call)
        texts: list[list[str]] = [[] for _ in range(answer.n)]
        calls = [ToolCalls() for _ in range(answer.n)]
        try:
            while True:
                event = await _next(job, self.policy.header_timeout_s)
                kind = event.WhichOneof("kind")
                if kind == "tokens":
                    index = answer.choice(job, event.tokens)
                    texts[index].append(event.tokens.text)
                    calls[index].add(event.tokens.tool_calls)
                    answer.logprobs(event.tokens)
                elif kind == "end":
                    if event.end.result:
                        return event.end.result
                    joined = ["".join(text) for text in texts]
                    return orjson.dumps(_whole(call, job, answer, joined, event.end, calls))
                else:
                    raise _error(job, event.error)
        finally:
            self.registry.cancel(job)  # a no-op once the job ended

    async def stream(self, call: Call, attempt: Attempt) -> TargetStream:
        return NodeStream(self.registry, await self._dispatch(call, attempt), call, self.policy.idle_timeout_s)


class NodeStream(TargetStream):
    def __init__(self, registry: NodeRegistry, job: Job, call: Call, idle_timeout_s: float) -> None:
        self.registry = registry
        self.job = job
        self.call = call
        self.idle_timeout_s = idle_timeout_s
        self._batches = self._read()

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._batches

    async def _read(self) -> AsyncGenerator[list[bytes], None]:
        chat = self.call.endpoint == "chat/completions"
        legacy = _legacy_functions(self.call.body)
        base = _chunk_base(self.call, self.job, chat)
        answer = _Answer(self.call)
        opened = [not chat] * answer.n  # whether a choice's first chunk (its role, in a chat) went out
        batch: list[bytes] = []
        event: pb.JobEvent | None = await _next(self.job, self.idle_timeout_s)
        while event is not None:
            kind = event.WhichOneof("kind")
            if kind == "tokens":
                tokens = event.tokens
                index = answer.choice(self.job, tokens)
                if not opened[index]:
                    # An answer that opens with a tool call has no content at all: null, as OpenAI streams it.
                    calling = not tokens.text and bool(tokens.tool_calls)
                    batch.append(_role(base, index, None if calling else ""))
                    opened[index] = True
                logprobs = answer.logprobs(tokens)
                if tokens.text or not tokens.tool_calls or logprobs is not None:
                    choice = (
                        {"index": index, "delta": {"content": tokens.text}}
                        if chat
                        else {"index": index, "text": tokens.text}
                    )
                    batch.append(_chunk(base, {**choice, "finish_reason": None, "logprobs": logprobs}))
                for delta in tokens.tool_calls if chat else ():
                    choice = {"index": index, "delta": tool_call_delta(delta, legacy)}
                    batch.append(_chunk(base, {**choice, "finish_reason": None, "logprobs": None}))
            elif kind == "end":
                end = event.end
                for index, reason in enumerate(answer.finish_reasons(end)):
                    if not opened[index]:
                        batch.append(_role(base, index, ""))
                    finish = {"index": index, "delta": {}} if chat else {"index": index, "text": ""}
                    batch.append(_chunk(base, {**finish, "finish_reason": reason, "logprobs": None}))
                batch.append(orjson.dumps({**base, "choices": [], "usage": _usage(end)}))
                self.done = True
                yield batch
                return
            else:
                if batch:
                    yield batch  # what the node sent before its error still reaches the client
                raise _error(self.job, event.error)
            # Events that came in behind this one (the last batch and the end, typically) leave in one write.
            event = _queued(self.job)
            if event is None:
                yield batch
                batch = []
                event = await _next(self.job, self.idle_timeout_s)

    async def aclose(self) -> None:
        await self._batches.aclose()
        self.registry.cancel(self.job)


async def _next(job: Job, timeout_s: float) -> pb.JobEvent:
    try:
        async with asyncio.timeout(timeout_s):
            event = await job.events.get()
    except TimeoutError:
        raise UpstreamTimeoutError(f"node {job.session.name}: no token for {timeout_s:g}s") from None
    return _arrived(job, event)


def _queued(job: Job) -> pb.JobEvent | None:
    """The job's next event if it is already in, else None."""
    try:
        return _arrived(job, job.events.get_nowait())
    except asyncio.QueueEmpty:
        return None


def _arrived(job: Job, event: pb.JobEvent | SessionLost) -> pb.JobEvent:
    if isinstance(event, SessionLost):
        raise UpstreamConnectError(f"node {job.session.name} went away during the job")
    return event


class _Answer:
    """The choices of a node's answer: the request's `n`, each with its logprobs when the request asked for them."""

    def __init__(self, call: Call) -> None:
        self.n = choices(call.body)[0]
        top = requested(call.endpoint, call.body)
        chat = call.endpoint == "chat/completions"
        offset = 0 if chat else first_offset(call.body)
        self._logprobs = [ChoiceLogprobs(chat, top, offset) for _ in range(self.n)] if top is not None else None

    def choice(self, job: Job, tokens: pb.TokenBatch) -> int:
        """The batch's choice index; a node that names one the request did not ask for is broken."""
        if tokens.choice >= self.n:
            raise UpstreamProtocolError(f"node {job.session.name}: choice {tokens.choice} of a request for {self.n}")
        return tokens.choice

    def logprobs(self, tokens: pb.TokenBatch) -> dict[str, Any] | None:
        """The batch's logprobs fragment for its chunk (None when not asked for), kept for the whole answer."""
        if self._logprobs is None:
            return None
        return self._logprobs[tokens.choice].add(tokens.logprobs)

    def whole_logprobs(self, index: int) -> dict[str, Any] | None:
        return None if self._logprobs is None else self._logprobs[index].whole()

    def finish_reasons(self, end: pb.JobEnd) -> list[str]:
        """Each choice's finish reason: from JobEnd.choices for several, else JobEnd's own (an older agent's)."""
        reasons = [end.finish_reason] * self.n
        for choice in end.choices:
            if choice.index < self.n:
                reasons[choice.index] = choice.finish_reason
        return reasons


# An agent's invalid_request message names the parameter first, in quotes (agent.sampling.InvalidParameter).
_PARAM = re.compile(r"'([A-Za-z_][A-Za-z0-9_]{0,63})'")


def _error(job: Job, error: pb.JobError) -> UpstreamError:
    message = f"node {job.session.name}: {error.message}"
    if error.code in ("context_length_exceeded", "invalid_request"):
        named = _PARAM.match(error.message) if error.code == "invalid_request" else None
        param = named.group(1) if named else None
        envelope = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": error.code}}
        return UpstreamStatusError(400, orjson.dumps(envelope))
    if error.code == "busy":
        return UpstreamConnectError(message)
    return UpstreamProtocolError(message)


def _usage(end: pb.JobEnd) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
    }


def _chunk_base(call: Call, job: Job, chat: bool) -> dict[str, Any]:
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.session.node_id}-{job.job_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "system_fingerprint": None,
    }


def _chunk(base: dict[str, Any], choice: dict[str, Any]) -> bytes:
    return orjson.dumps({**base, "choices": [choice]})


def _role(base: dict[str, Any], index: int, content: str | None) -> bytes:
    return _chunk(base, {"index": index, "delta": {"role": "assistant", "content": content}, "finish_reason": None})


def _whole(
    call: Call, job: Job, answer: _Answer, texts: list[str], end: pb.JobEnd, calls: list[ToolCalls]
) -> dict[str, Any]:
    chat = call.endpoint == "chat/completions"
    legacy = _legacy_functions(call.body)
    listed = []
    for index, reason in enumerate(answer.finish_reasons(end)):
        choice: dict[str, Any] = (
            {"index": index, "message": calls[index].message(texts[index], legacy)}
            if chat
            else {"index": index, "text": texts[index]}
        )
        listed.append({**choice, "finish_reason": reason, "logprobs": answer.whole_logprobs(index)})
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.session.node_id}-{job.job_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": listed,
        "usage": _usage(end),
        "system_fingerprint": None,
    }


def _legacy_functions(body: dict[str, Any]) -> bool:
    """Whether the request offered legacy `functions`: the answer then holds a `function_call`, not tool_calls."""
    return body.get("functions") is not None and body.get("tools") is None


def tool_call_delta(delta: pb.ToolCallDelta, legacy: bool) -> dict[str, Any]:
    """A node's tool-call fragment as the `delta` of a chunk, as OpenAI streams calls: the first fragment of a
    call with its id, type and name (and arguments, often empty), the later ones with arguments only."""
    if legacy:
        first = {"name": delta.name, "arguments": delta.arguments}
        return {"function_call": first if delta.id else {"arguments": delta.arguments}}
    call: dict[str, Any] = {"index": delta.index}
    if delta.id:
        call.update(id=delta.id, type="function", function={"name": delta.name, "arguments": delta.arguments})
    else:
        call["function"] = {"arguments": delta.arguments}
    return {"tool_calls": [call]}


class ToolCalls:
    """A node's tool-call fragments put back together, for a whole answer's message."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[str, str, list[str]]] = {}  # index -> id, name, arguments

    def add(self, deltas: Iterable[pb.ToolCallDelta]) -> None:
        for delta in deltas:
            known = self._calls.get(delta.index)
            if known is None:
                self._calls[delta.index] = (delta.id, delta.name, [delta.arguments])
            else:
                known[2].append(delta.arguments)

    def message(self, text: str, legacy: bool) -> dict[str, Any]:
        """The chat message of an answer of `text` and these calls: content null when it is only calls."""
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if not self._calls:
            return message
        calls = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(arguments)}}
            for _, (call_id, name, arguments) in sorted(self._calls.items())
        ]
        message["content"] = text or None
        if legacy:
            message["function_call"] = calls[0]["function"]
        else:
            message["tool_calls"] = calls
        return message


def _affinity(org_id: str, body: dict[str, Any]) -> str | None:
    """A conversation's identity: its messages up to the first assistant turn. Follow-up turns share it, so
    they land on the node whose llama.cpp prompt cache already holds that prefix."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    prefix = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "assistant":
            break
        prefix.append(message)
    return hashlib.sha256(orjson.dumps([org_id, body.get("model"), prefix])).hexdigest()


def _cheapest(prices: Any) -> float | None:
    known = [p for p in map(bounded_price, prices) if p is not None]
    return min(known) if known else None


def bounded_price(price: float | None) -> float | None:
    """A node's price as billed: within [0, MAX_PRICE], the bound a Hello is checked against (server.nodes.bounds),
    held here again because the price is what a node earns; one that is not a number is no price at all."""
    if price is None or math.isnan(price):
        return None
    return min(max(price, 0.0), MAX_PRICE)
