"""What every target offers the attempt loop.

A target answers an OpenAI request body either whole (`complete`) or as a stream of SSE data payloads
(`stream`). Failures are raised as `server.errors.UpstreamError` subclasses so the attempt loop can decide
what to do next (`server.routing.failover.decide`); a stream that has started raises the same classes from its
iterator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.routing.continuation import ContinuationForm
from server.routing.failover import FailoverPolicy
from server.usage.metering import Generated


@dataclass(frozen=True, slots=True)
class Call:
    """One request to send: the endpoint path under /v1 and the body to send (the client's, or a rescue's)."""

    endpoint: str
    body: dict[str, Any]
    request_id: str


@dataclass
class Attempt:
    """One try of one target; the target notes which credential it used, and a pool which member served."""

    number: int
    key_id: str | None = None
    # The node that served, for a node pool (else the target's own id is the route).
    route: str | None = None
    # USD per 1M tokens (in, out) of what served, when it differs from the target's own price.
    price: tuple[float | None, float | None] | None = None
    # The served model's context in tokens, when the target knows it (a node says it): bounds reported usage.
    context: int | None = None
    # For a target that generates on after the plane stopped reading (a node, until it sees the cancel): waits,
    # bounded, for its own final count, which a client that left is billed (server.relay).
    generated: Callable[[], Awaitable[Generated]] | None = None


class TargetStream(ABC):
    """SSE data payloads (the bytes after `data: `) until the upstream's `[DONE]`, which is not yielded, in batches:
    the payloads that arrived together, which a relay forwards in one write. Never an empty batch."""

    # True once the upstream sent `[DONE]`: a stream that ends without it may have been cut.
    done: bool = False

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[list[bytes]]: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Target(ABC):
    kind: str
    # Shown in `x-hatchway-route` and usage rows, and named by routing rules.
    id: str
    # Unique per (provider, upstream model): what health statistics are kept under.
    key: str
    upstream_model: str
    price_in: float | None
    price_out: float | None
    policy: FailoverPolicy
    # How the target continues a broken stream for a rescue (server.routing.continuation): declared, never learnt.
    continuation: ContinuationForm
    # Whether it serves OpenAI's /v1/responses itself (declared for a provider); else the plane translates a
    # /v1/responses request to chat completions for it (server.responses).
    speaks_responses: bool = False

    @abstractmethod
    async def complete(self, call: Call, attempt: Attempt) -> bytes:
        """Return the raw JSON body of a successful (200) answer."""

    @abstractmethod
    async def stream(self, call: Call, attempt: Attempt) -> TargetStream:
        """Return once the target accepted the stream (headers received)."""

    def has_capacity(self) -> bool:
        """Whether an attempt could start now without queueing: a node pool says whether a slot is free; a provider
        is taken to have capacity (its limits show as 429s, which fail over)."""
        return True

    def has_other_key(self, key_id: str | None) -> bool:
        """Whether another credential could be tried after `key_id` was refused or rate-limited."""
        return False

    def rest_key(self, key_id: str | None, seconds: float) -> None:  # noqa: B027  (optional hook)
        """Keep a credential out of rotation for a while (after a 429 or 401); targets without keys ignore it."""

    def price(self, attempt: Attempt | None = None) -> tuple[float | None, float | None]:
        """USD per 1M tokens (in, out) of what served: the node's own for a pool, else the target's."""
        return attempt.price if attempt and attempt.price else (self.price_in, self.price_out)

    def cost(self, prompt_tokens: int, completion_tokens: int, attempt: Attempt | None = None) -> float | None:
        """USD for this usage at the price of what served, or None when it is unpriced."""
        price_in, price_out = self.price(attempt)
        if price_in is None and price_out is None:
            return None
        return (prompt_tokens * (price_in or 0.0) + completion_tokens * (price_out or 0.0)) / 1e6
