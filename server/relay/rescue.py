"""The relay's side of a mid-stream rescue (server.routing.continuation holds the rules): find a target that continues a
committed stream that broke, and trim what it sends to what the client lacks.

rescue                  the attempt loop over the targets that may continue (their declared form,
                        server.routing.continuation),
                        the target that broke the stream tried last; a prefill a target refuses (400/422) is
                        regenerated instead, and checked to begin with exactly the delivered text
trim_to_continuation    a rescuing target's chunk, cut to what follows the delivered text
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from server.errors import UpstreamError, UpstreamStatusError
from server.relay.attempts import AttemptLoop
from server.relay.exchange import Exchange
from server.routing.continuation import Continuation, StreamProgress, choice_text, rescue_request
from server.routing.failover import is_context_length_error
from server.targets.base import Attempt, Call, Target

if TYPE_CHECKING:
    # server.relay.stream calls `rescue` with its own opener: the type only, to keep the import one way.
    from server.relay.stream import OpenStream

log = logging.getLogger(__name__)


async def rescue(
    attempts: AttemptLoop,
    open_stream: Callable[[Target, Attempt, Call, Exchange, Continuation | None], Awaitable[OpenStream]],
    exchange: Exchange,
    progress: StreamProgress,
    *,
    failed: Target,
) -> OpenStream:
    """Find a target that continues the delivered answer, each in its declared form (server.routing.continuation);
    `open_stream` opens it up to its first content token (`Streams._open`)."""

    async def open_rescue(target: Target, attempt: Attempt) -> OpenStream:
        body, continuation = rescue_request(exchange.body, progress, target.continuation)
        try:
            return await open_stream(
                target, attempt, Call(exchange.endpoint, body, exchange.request_id), exchange, continuation
            )
        except UpstreamStatusError as exc:
            if not continuation.prefilled or exc.upstream_status not in (400, 422) or is_context_length_error(exc):
                raise
        # Declared wrongly, or the model's template refuses it: a new answer can still be checked.
        log.warning(
            "request %s: %s refused a continuation by prefill; regenerating (declare it --continuation regenerate)",
            exchange.request_id,
            target.id,
        )
        _, continuation = rescue_request(exchange.body, progress, "regenerate")
        return await open_stream(target, attempt, exchange.call, exchange, continuation)

    rescuers = [
        replace(plan, targets=tuple(t for t in plan.targets if t.continuation != "none")) for plan in exchange.plans
    ]
    if not any(plan.targets for plan in rescuers):
        raise UpstreamError(f"no target for '{exchange.model}' may continue a broken stream")
    return await attempts.attempt(exchange, open_rescue, last=failed, plans=rescuers)


def trim_to_continuation(chunk: dict[str, Any], continuation: Continuation, chat: bool) -> dict[str, Any] | None:
    """A rescuing target's chunk, trimmed to what the client lacks; None when nothing of it is to be relayed."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return chunk if "usage" in chunk else None
    kept = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        rest = continuation.feed(choice_text(choice))
        finish = choice.get("finish_reason")
        if finish:
            rest += continuation.finish()
        if not rest and not finish:
            continue  # the role chunk, or text the client already has
        if chat:
            kept.append({**choice, "delta": {"content": rest} if rest else {}})
        else:
            kept.append({**choice, "text": rest})
    return {**chunk, "choices": kept} if kept else None
