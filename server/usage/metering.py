"""What a request is billed: the usage a target reports, held to bounds the plane computes itself.

An upstream's `usage` and a node's `JobEnd` are claims. Before a claim is billed, counted against limits,
recorded or credited to a node, each figure is clamped to

    prompt      <= the request body's bytes + PROMPT_SLACK_TOKENS (a chat template, a default system prompt),
                   + IMAGE_TOKENS per image part; a part the body only references (a file id) leaves the
                   model's context, else PLANE_MAX_PROMPT_TOKENS, as the bound; never above the context
    completion  <= what the request allowed: (max_completion_tokens | max_tokens | the context |
                   PLANE_MAX_COMPLETION_TOKENS) x choices (n, best_of; at most MAX_CHOICES)
                and <= what was delivered: the UTF-8 bytes of the generated text (content, refusal, reasoning,
                   tool calls) + CHOICE_SLACK_TOKENS and the longest stop string per choice, + TOOL_CALL_SLACK_TOKENS
                   per tool call. In byte-level BPE vocabularies (and SentencePiece with byte fallback) every
                   token decodes to at least one byte, so this is an upper bound; the slack covers what is
                   generated but never delivered (an end-of-turn token, a stop string).

A provider may also bill tokens nobody sees: reasoning, audio, rejected predictions (its
`completion_tokens_details`), and the extra candidates of `best_of`. Those are allowed on top of the delivered
bound, within what the request allowed. A node has no hidden tokens: its text is all it generated, so its
bound is exactly the delivered one. Anything above a bound is a protocol violation: counted in
`hatchway_usage_claims_clamped_total{target_kind}`, logged at most once per target per LOG_INTERVAL_S, and billed
only up to the bound. A negative or non-integer figure counts as 0.

`Delivery` is the plane's own count of what left for the client (bytes, content chunks, tool calls): the bound
above, and the figure a request can be billed from when no claim arrives (a client that left before the end).

A client that leaves mid-answer is billed what was generated for it (server.relay): the target's claim when it
arrived (an upstream's usage chunk, a node's JobEnd, which a node sends when it stops for a cancel), held to the
bounds above (for a node, to the text it sent, delivered or not: `Generated`); else the delivered estimate,
`delivered_tokens`: max(content chunks, ceil(delivered UTF-8 bytes / BYTES_PER_TOKEN)), within what the request
allowed, with the prompt estimated as at admission (server.policy.limits.estimate_tokens). The plane ships no tokenizer
for providers' models, so this is an estimate: about 4 bytes a token is what OpenAI's and Llama's BPE vocabularies
average on English prose (less on code and digits, about the same on CJK text, 3 bytes a character); streams that
send one token a chunk, as OpenAI's do, are counted exactly by the chunk floor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

log = logging.getLogger(__name__)

# Per choice, when neither the request (max_tokens) nor the model (its context) says how long an answer may be.
# No model today writes a million tokens in one answer.
PLANE_MAX_COMPLETION_TOKENS = 1 << 20
# The most a prompt is billed when the body cannot bound it (it references content by id) and the context is
# not known: the largest context windows offered today.
PLANE_MAX_PROMPT_TOKENS = 1 << 21
# OpenAI's `n` goes up to 128; choices beyond are not billed.
MAX_CHOICES = 128
# Template tokens around the messages, a default system prompt, the tool preamble: never delivered as body bytes.
PROMPT_SLACK_TOKENS = 1024
# An image part costs a fixed number of tokens whatever its URL's length: 4096 covers every published scheme
# (tiles of 512 px, patches of 32 px) at the highest detail.
IMAGE_TOKENS = 4096
# Per choice: the end-of-turn token, special tokens the server drops, a character split across tokens.
CHOICE_SLACK_TOKENS = 16
# Per tool call: the call's framing (recipient, wrappers) is generated but not delivered. A node's
# `<tool_call>\n{"name": "", "arguments": }\n</tool_call>` (agent.tools) is about 24 tokens in small vocabularies.
TOOL_CALL_SLACK_TOKENS = 32
# Hidden completion tokens a provider may report (OpenAI's `completion_tokens_details`).
HIDDEN_DETAILS = ("reasoning_tokens", "audio_tokens", "rejected_prediction_tokens")
LOG_INTERVAL_S = 60.0
# Where generated text is delivered: chat `content` (and `refusal`, and the reasoning some servers stream), a
# legacy completion's `text`.
_TEXT_FIELDS = frozenset({"content", "text", "refusal", "reasoning_content", "reasoning"})
# Figures shown in a log line are capped: a claim is whatever a peer sent.
_SHOWN_MAX = (1 << 64) - 1
# Delivered UTF-8 bytes per token when an answer no usage came for is billed (see the module doc).
BYTES_PER_TOKEN = 4


class Delivery:
    """What the plane relayed of an answer: UTF-8 bytes of generated text, content chunks, tool calls.

    `observe` takes a stream chunk, `observe_whole` a whole answer; both read every choice.
    """

    __slots__ = ("bytes", "chunks", "rescued_bytes", "tool_calls")

    def __init__(self) -> None:
        self.bytes = 0
        self.chunks = 0
        self.tool_calls = 0
        # What had been delivered when the last rescue began: a prefill rescuer reads it as prompt.
        self.rescued_bytes = 0

    def observe(self, chunk: dict[str, Any]) -> None:
        self._choices(chunk, "delta")

    def covering(self, text_bytes: int) -> Delivery:
        """A copy that counts at least `text_bytes` of generated text: what a target sent, delivered or not."""
        copy = Delivery()
        copy.bytes, copy.chunks = max(self.bytes, text_bytes), self.chunks
        copy.tool_calls, copy.rescued_bytes = self.tool_calls, self.rescued_bytes
        return copy

    def observe_whole(self, doc: dict[str, Any]) -> None:
        self._choices(doc, "message")

    def _choices(self, doc: dict[str, Any], inner: str) -> None:
        """Each choice's generated parts: its `delta` (a chunk) or `message` (a whole chat answer), else the
        choice itself (a legacy completion's `text`)."""
        choices = doc.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    part = choice.get(inner)
                    self._add(part if isinstance(part, dict) else choice)

    def _add(self, part: dict[str, Any]) -> None:
        size = 0
        # One pass over the part's keys: a delta holds one or two, and this runs for every chunk of every stream.
        for name, value in part.items():
            if name in _TEXT_FIELDS:
                if type(value) is str:
                    size += len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
            elif name == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        if "id" in call or "index" not in call:
                            self.tool_calls += 1  # a stream names each call's id once, in its first delta
                        size += _function_bytes(call.get("function"))
            elif name == "function_call":
                if isinstance(value, dict) and "name" in value:
                    self.tool_calls += 1  # a legacy call, named once, in its first delta
                size += _function_bytes(value)
        if size:
            self.bytes += size
            self.chunks += 1


def delivered_tokens(delivery: Delivery) -> int:
    """The completion tokens an answer is billed from what was delivered of it, when no claim came (module doc)."""
    return max(delivery.chunks, -(-delivery.bytes // BYTES_PER_TOKEN))


@dataclass(frozen=True, slots=True)
class Generated:
    """A target's own final count of an attempt the plane stopped reading (a node's JobEnd after a cancel): its
    usage claim, None when none came, and the UTF-8 bytes of text it sent, delivered or not (the claim's bound)."""

    usage: dict[str, Any] | None
    text_bytes: int


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _function_bytes(function: Any) -> int:
    if not isinstance(function, dict):
        return 0
    size = 0
    for name in ("name", "arguments"):
        value = function.get(name)
        if isinstance(value, str):
            size += _utf8_len(value)
    return size


@dataclass(slots=True)
class Claim:
    """The figures a target reported, as non-negative integers (anything else reads as 0)."""

    prompt: int
    completion: int
    hidden: int
    # Whether a figure was negative or not an integer (itself a violation).
    malformed: bool

    @classmethod
    def read(cls, usage: dict[str, Any]) -> Claim:
        prompt, bad_prompt = _figure(usage.get("prompt_tokens"))
        completion, bad_completion = _figure(usage.get("completion_tokens"))
        hidden = 0
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict):
            for name in HIDDEN_DETAILS:
                hidden += _figure(details.get(name))[0]
        return cls(prompt, completion, hidden, bad_prompt or bad_completion)


def _figure(value: Any) -> tuple[int, bool]:
    """(value, malformed): a non-negative int as is; absent is 0; anything else is 0 and malformed."""
    if value is None:
        return 0, False
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, False) if value >= 0 else (0, True)
    return 0, True


@dataclass(slots=True)
class MeteredRequest:
    """What bounds a request's usage: its endpoint and body, the body's size, and what served it."""

    endpoint: str
    body: dict[str, Any]
    body_bytes: int
    # "provider" or "node"; a node has no hidden tokens.
    target_kind: str
    # The served model's context in tokens, when known.
    context: int | None = None


def choices(body: dict[str, Any]) -> tuple[int, int]:
    """(delivered, generated) choices: `n`, and `best_of` when a legacy completion generates more than it sends."""
    n = _positive(body.get("n")) or 1
    best_of = _positive(body.get("best_of")) or n
    return min(n, MAX_CHOICES), min(max(n, best_of), MAX_CHOICES)


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def completion_allowed(request: MeteredRequest) -> int:
    """Completion tokens the request allowed in all: per choice times the choices generated."""
    body = request.body
    if request.endpoint == "embeddings":
        return 0
    per_choice = _positive(body.get("max_completion_tokens")) or _positive(body.get("max_tokens"))
    context = _positive(request.context)
    if per_choice is None:
        per_choice = context or PLANE_MAX_COMPLETION_TOKENS
    elif context is not None:
        per_choice = min(per_choice, context)
    return min(per_choice, PLANE_MAX_COMPLETION_TOKENS) * choices(body)[1]


def completion_bound(request: MeteredRequest, delivery: Delivery, hidden: int) -> int:
    """The most completion tokens that can have been generated for what was delivered (see the module doc)."""
    allowed = completion_allowed(request)
    if allowed == 0:
        return 0
    delivered, generated = choices(request.body)
    stop = _longest_stop(request.body.get("stop"))
    bound = delivery.bytes + delivered * (CHOICE_SLACK_TOKENS + stop) + delivery.tool_calls * TOOL_CALL_SLACK_TOKENS
    if request.target_kind != "node":
        per_choice = allowed // generated
        bound += min(hidden, allowed) + (generated - delivered) * per_choice
    return min(bound, allowed)


def _longest_stop(stop: Any) -> int:
    if isinstance(stop, str):
        return _utf8_len(stop)
    if isinstance(stop, list):
        return max((_utf8_len(s) for s in stop[:4] if isinstance(s, str)), default=0)
    return 0


def prompt_bound(request: MeteredRequest, delivery: Delivery) -> int:
    """The most prompt tokens the request can have been (see the module doc)."""
    bound = request.body_bytes + delivery.rescued_bytes + PROMPT_SLACK_TOKENS
    context = _positive(request.context)
    extra = _referenced_content(request.body)
    if extra is None:
        return context or PLANE_MAX_PROMPT_TOKENS
    bound += extra
    return min(bound, context) if context is not None else bound


def _referenced_content(body: dict[str, Any]) -> int | None:
    """Tokens of content a body names but does not hold: IMAGE_TOKENS per image, None when a part is unbounded."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    extra = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                extra += IMAGE_TOKENS
            elif kind == "file":
                return None
    return extra


class Meter:
    """Checks each claim against its bounds; counts and logs (rate-limited per target) what it clamps."""

    def __init__(self, clamped: Counter, clock: Any = time.monotonic) -> None:
        self.clamped = clamped
        # Children looked up once: `labels()` builds and locks on every call.
        self._children = {kind: clamped.labels(kind) for kind in ("provider", "node")}
        self.clock = clock
        # Per target: when it was last logged, and how many clamps went unlogged since.
        self._logged: dict[str, tuple[float, int]] = {}

    def bill(
        self, request: MeteredRequest, delivery: Delivery, usage: dict[str, Any], target: str
    ) -> tuple[int, int, bool]:
        """(prompt, completion, clamped): the figures to bill for a claim, and whether they differ from it."""
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        # The common case costs a few comparisons: integers within the delivered bytes, the body's size, the
        # request's max_tokens and the context, each tighter than the bound it stands for.
        if type(prompt) is int and type(completion) is int and 0 <= prompt <= request.body_bytes:
            body, context = request.body, request.context
            most = body.get("max_completion_tokens") or body.get("max_tokens") or PLANE_MAX_COMPLETION_TOKENS
            if (
                0 <= completion <= delivery.bytes
                and type(most) is int
                and completion <= most
                and (context is None or (prompt <= context and completion <= context))
            ):
                return prompt, completion, False
        claim = Claim.read(usage)
        prompt, completion = claim.prompt, claim.completion
        completion_max = completion_bound(request, delivery, claim.hidden)
        prompt_max = prompt_bound(request, delivery)
        if prompt <= prompt_max and completion <= completion_max and not claim.malformed:
            return prompt, completion, False
        billed_prompt, billed_completion = min(prompt, prompt_max), min(completion, completion_max)
        self._violation(request, target, usage, billed_prompt, billed_completion, prompt_max, completion_max)
        return billed_prompt, billed_completion, True

    def _violation(
        self,
        request: MeteredRequest,
        target: str,
        usage: dict[str, Any],
        prompt: int,
        completion: int,
        prompt_max: int,
        completion_max: int,
    ) -> None:
        kind = request.target_kind
        child = self._children.get(kind) or self.clamped.labels(kind)
        child.inc()
        now = self.clock()
        last, quiet = self._logged.get(target, (float("-inf"), 0))
        if now - last < LOG_INTERVAL_S:
            self._logged[target] = (last, quiet + 1)
            return
        if len(self._logged) > 10_000:
            self._logged.clear()  # targets come and go (node ids): the map must not grow without end
        self._logged[target] = (now, 0)
        log.warning(
            "usage claim from %s %s exceeds what the request allowed or received; billed prompt %d (claimed %s, "
            "bound %d), completion %d (claimed %s, bound %d)%s",
            kind,
            target[:80],
            prompt,
            _shown(usage.get("prompt_tokens")),
            prompt_max,
            completion,
            _shown(usage.get("completion_tokens")),
            completion_max,
            f"; {quiet} more clamped since the last report" if quiet else "",
        )


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(max(-_SHOWN_MAX, min(value, _SHOWN_MAX)))
    return type(value).__name__


def bounded_usage(usage: dict[str, Any], prompt: int, completion: int) -> dict[str, Any]:
    """The usage object to show the client once a claim was clamped: the billed figures, details within them."""
    shown: dict[str, Any] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion}
    shown["total_tokens"] = prompt + completion
    for name, limit in (("prompt_tokens_details", prompt), ("completion_tokens_details", completion)):
        details = usage.get(name)
        if isinstance(details, dict):
            shown[name] = {k: min(_figure(v)[0], limit) if isinstance(v, int) else v for k, v in details.items()}
    return shown
