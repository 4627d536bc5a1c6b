"""What a job is (`Job`, on one of the endpoints CHAT, COMPLETIONS, EMBEDDINGS) and the events it yields:
`Text` pieces then one `End` (generation), or one `Result` (embeddings)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from agent.sampling import ChoiceEnd, TokenLogprob
from agent.tools import ToolCallDelta

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


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
