"""One client request on its way through the relay (`Exchange`), and what each step made of it.

Each step writes its own result, and only that: the attempt loop what serves the answer (`Serving`), the
accounting what it is billed and its final status (`Bill`), the stream what the client was sent (`Delivery`,
`first_byte_at`), and, on a cache miss that will be stored, the relay keeps the whole answer for the cache step
(`Capture`). The cache's verdict (`cache`) is fixed when the exchange is made.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from server.policy.cache import BYPASS, HIT, StreamAssembler
from server.policy.snapshot import KeyEntry
from server.responses.dialect import CHAT_ENDPOINT, Record, ResponsesDialect
from server.routing.health import TargetStats
from server.routing.rules import ModelPlan
from server.targets.base import Attempt, Call, Target
from server.usage.metering import Delivery

# Status recorded for a request whose client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class Serving:
    """What the attempt loop chose: the target serving the answer, its try, the model it serves (a fallback's when
    the route moved on), and the target's in-flight count, held until the answer is complete."""

    target: Target
    attempt: Attempt
    model: str | None = None
    holding: TargetStats | None = None


@dataclass
class Bill:
    """What the request is billed: the serving target's claim, held to the plane's bounds (server.usage.metering),
    or the delivered estimate when the client left before a claim came; and the final status."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Whether the serving target's claim arrived.
    reported: bool = False
    status: int | None = None
    # The bill of a request whose client left, while it waits for a node's own count (settle_limits waits too).
    pending: asyncio.Task[None] | None = None


@dataclass
class Capture:
    """What a cache miss that will be stored keeps of the answer: a stream's assembler (a Responses stream's
    record), then the whole answer once it is complete and was not rescued."""

    collect: StreamAssembler | Record | None = None
    answer: bytes | None = None


@dataclass
class Exchange:
    """One client request on its way through the plane, and what became of it."""

    request_id: str
    key: KeyEntry
    endpoint: str
    body: dict[str, Any]
    plans: list[ModelPlan]
    deadline_s: float
    # The body's size as received (0: not known, measured when a usage claim needs it).
    body_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    # What the response cache said (server.policy.cache), and what to keep of the answer to store it on a miss.
    cache: str = BYPASS
    capture: Capture | None = None
    # A /v1/responses request: how each attempt is sent and its answer read (server.responses.dialect).
    responses: ResponsesDialect | None = None
    attempts: int = 0
    rescues: int = 0
    # The last try of a whole answer to start: what worked on it when the client left (`WholeAnswers.complete`).
    underway: tuple[Target, Attempt] | None = None
    serving: Serving | None = None
    bill: Bill = field(default_factory=Bill)
    # What the client was sent of the answer, counted by the plane.
    delivery: Delivery = field(default_factory=Delivery)
    first_byte_at: float | None = None

    @property
    def target(self) -> Target | None:
        return self.serving.target if self.serving is not None else None

    @property
    def attempt(self) -> Attempt | None:
        return self.serving.attempt if self.serving is not None else None

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def streaming(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def chat(self) -> bool:
        return self.endpoint == "chat/completions"

    @property
    def wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @property
    def call(self) -> Call:
        return Call(endpoint=self.endpoint, body=self.body, request_id=self.request_id)

    @property
    def metered(self) -> tuple[str, dict[str, Any]]:
        """The endpoint and body the request's usage is bounded and estimated by: a /v1/responses request's chat
        form, which is what a target generates from."""
        if self.responses is not None:
            return CHAT_ENDPOINT, self.responses.chat_body
        return self.endpoint, self.body

    @property
    def time_left_s(self) -> float:
        return self.started + self.deadline_s - time.monotonic()

    def cost(self) -> float | None:
        if self.cache == HIT:
            return 0.0  # a cached answer is free, not unpriced
        if self.serving is None:
            return None
        return self.serving.target.cost(self.bill.prompt_tokens, self.bill.completion_tokens, self.serving.attempt)

    @property
    def charged(self) -> bool:
        """Whether tokens are billed: an answer served upstream, or one its client left (499) after tokens were
        generated for it. A cached answer is free; a failed one is not billed."""
        if self.cache == HIT:
            return False
        bill = self.bill
        return bill.status == 200 or (bill.status == CLIENT_CLOSED and bill.prompt_tokens + bill.completion_tokens > 0)

    def billed(self) -> tuple[int, float]:
        """(tokens, USD) this request consumed, to settle its limits: nothing unless it was charged."""
        if not self.charged:
            return 0, 0.0
        return self.bill.prompt_tokens + self.bill.completion_tokens, self.cost() or 0.0

    @property
    def route(self) -> str:
        """What served: the provider's name, or the node's id for a node pool."""
        if self.attempt is not None and self.attempt.route:
            return self.attempt.route
        return self.target.id if self.target else ""

    def headers(self) -> dict[str, str]:
        headers = {"x-hatchway-attempts": str(self.attempts), "x-hatchway-cache": self.cache}
        if self.target is not None:
            headers["x-hatchway-route"] = self.route
        served_model = self.serving.model if self.serving is not None else None
        if served_model is not None and served_model != self.model:
            headers["x-hatchway-model"] = served_model
        if self.attempt is not None and self.attempt.key_id:
            headers["x-hatchway-provider-key"] = self.attempt.key_id
        return headers
