"""What every target offers the attempt loop.

A target answers an OpenAI request body either whole (`complete`) or as a stream of SSE data payloads
(`stream`). Failures are raised as `server.errors.UpstreamError` subclasses so the attempt loop can decide
whether another target may succeed; a stream that has started raises the same classes from its iterator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Call:
    """One request to send: the endpoint path under /v1 and the body as the client sent it."""

    endpoint: str
    body: dict[str, Any]
    request_id: str


class TargetStream(ABC):
    """SSE data payloads (the bytes after `data: `) until the upstream's `[DONE]`, which is not yielded."""

    # True once the upstream sent `[DONE]`: a stream that ends without it was cut.
    done: bool = False

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Target(ABC):
    kind: str
    # Stable identifier reported in `x-hatchway-route` and usage rows.
    id: str
    upstream_model: str
    price_in: float | None
    price_out: float | None

    @abstractmethod
    async def complete(self, call: Call) -> bytes:
        """Return the raw JSON body of a successful (200) answer."""

    @abstractmethod
    async def stream(self, call: Call) -> TargetStream:
        """Return once the target accepted the stream (headers received)."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD for this usage at the target's price, or None when the target is unpriced."""
        if self.price_in is None and self.price_out is None:
            return None
        return (prompt_tokens * (self.price_in or 0.0) + completion_tokens * (self.price_out or 0.0)) / 1e6
