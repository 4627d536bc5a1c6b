"""One client request on its way through the relay, and what became of it (`Exchange`).

Every step of the relay reads and writes the same exchange: the attempt loop sets what served (`target`,
`attempt`, `served_model`), the accounting what it is billed (`prompt_tokens`, `completion_tokens`) and its final
`status`, the stream what the client was sent (`delivery`, `first_byte_at`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from server.cache import BYPASS, HIT, StreamAssembler
from server.health import TargetStats
from server.metering import Delivery
from server.responses.dialect import CHAT_ENDPOINT, Record, ResponsesDialect
from server.routing import ModelPlan
from server.snapshot import KeyEntry
from server.targets.base import Attempt, Call, Target

# Status recorded for a request whose client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499


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
    attempts: int = 0
    rescues: int = 0
    target: Target | None = None
    attempt: Attempt | None = None
    served_model: str | None = None
    # The tokens billed: the serving target's claim, held to the plane's bounds (server.metering), or the
    # delivered estimate when the client left before a claim came.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Whether the serving target's claim arrived.
    usage_reported: bool = False
    # The bill of a request whose client left, while it waits for a node's own count (settle_limits waits too).
    pending: asyncio.Task[None] | None = None
    # The last try of a whole answer to start: what worked on it when the client left (`WholeAnswers.complete`).
    underway: tuple[Target, Attempt] | None = None
    # What the client was sent of the answer, counted by the plane.
    delivery: Delivery = field(default_factory=Delivery)
    first_byte_at: float | None = None
    # The serving target's in-flight count, held until the answer is complete.
    holding: TargetStats | None = None
    # What the response cache said (server.cache), and the whole answer to store on a miss.
    cache: str = BYPASS
    collect: StreamAssembler | Record | None = None
    # A /v1/responses request: how each attempt is sent and its answer read (server.responses.dialect).
    responses: ResponsesDialect | None = None
    answer: bytes | None = None
    # The final status, once the request is over.
    status: int | None = None

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
        return self.target.cost(self.prompt_tokens, self.completion_tokens, self.attempt) if self.target else None

    @property
    def charged(self) -> bool:
        """Whether tokens are billed: an answer served upstream, or one its client left (499) after tokens were
        generated for it. A cached answer is free; a failed one is not billed."""
        if self.cache == HIT:
            return False
        return self.status == 200 or (self.status == CLIENT_CLOSED and self.prompt_tokens + self.completion_tokens > 0)

    def billed(self) -> tuple[int, float]:
        """(tokens, USD) this request consumed, to settle its limits: nothing unless it was charged."""
        if not self.charged:
            return 0, 0.0
        return self.prompt_tokens + self.completion_tokens, self.cost() or 0.0

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
        if self.served_model is not None and self.served_model != self.model:
            headers["x-hatchway-model"] = self.served_model
        if self.attempt is not None and self.attempt.key_id:
            headers["x-hatchway-provider-key"] = self.attempt.key_id
        return headers
