"""Mid-stream rescue: what a committed stream has delivered, and how a fallback continues it.

`StreamProgress` watches the chunks relayed to the client: the text delivered so far, whether the answer
finished, and whether it can be rescued at all (one choice of plain text: tool-call streams and `n > 1` cannot
be stitched together honestly). When the stream breaks, a fallback target is asked to continue:

    prefill      the original request plus the delivered text as a final assistant message (chat) or
                 appended to the prompt (completions); everything the fallback generates is new text
    regenerate   the original request again; its answer is forwarded only past the delivered text, and only
                 if it begins with exactly that text (`Continuation` checks it, else the rescue fails)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ContinuationMismatch(Exception):
    """The regenerated answer does not begin with the text the client already has."""


@dataclass
class StreamProgress:
    chat: bool
    text: list[str] = field(default_factory=list)
    content_chunks: int = 0
    finished: bool = False
    # Only one choice of plain text can be continued; anything else makes the stream unrescuable.
    rescuable: bool = True
    first_id: str | None = None
    first_created: int | None = None

    @property
    def delivered(self) -> str:
        return "".join(self.text)

    def observe(self, chunk: dict[str, Any]) -> bool:
        """Note what a chunk carries; True when it carries the answer itself (content, a tool call or a finish),
        which is what commits a stream to the client."""
        if self.first_id is None and isinstance(chunk.get("id"), str):
            self.first_id = chunk["id"]
            created = chunk.get("created")
            self.first_created = created if isinstance(created, int) else None
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        substantive = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.rescuable = False
            if choice.get("finish_reason"):
                self.finished = True
                substantive = True
            text = choice_text(choice)
            if text:
                self.text.append(text)
                self.content_chunks += 1
                substantive = True
            delta = choice.get("delta")
            if isinstance(delta, dict) and (delta.get("tool_calls") or delta.get("function_call")):
                self.rescuable = False
                substantive = True
        return substantive


def choice_text(choice: dict[str, Any]) -> str:
    """The text a stream choice adds: `delta.content` for chat chunks, `text` for completion chunks."""
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return content if isinstance(content, str) else ""


def can_rescue(body: dict[str, Any], progress: StreamProgress) -> bool:
    n = body.get("n")
    return progress.rescuable and (n is None or n == 1) and not progress.finished


def prefill_body(body: dict[str, Any], progress: StreamProgress) -> dict[str, Any] | None:
    """The request that asks a target to continue the delivered text, or None when there is no such form."""
    delivered = progress.delivered
    continued: dict[str, Any] = dict(body)
    if progress.chat:
        continued["messages"] = [*body["messages"], {"role": "assistant", "content": delivered}]
    elif isinstance(body.get("prompt"), str):
        continued["prompt"] = body["prompt"] + delivered
    else:
        return None
    # What was delivered counts against the client's budget (one token per content chunk, as servers send).
    for limit in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(limit), int):
            continued[limit] = max(1, body[limit] - progress.content_chunks)
    return continued


class Continuation:
    """Turns a rescuing target's text into what the client still lacks.

    With `regenerate`, the target's answer restarts from the beginning: it is held back until it is longer
    than the delivered text, checked to begin with exactly that text, and only the rest is passed on.
    """

    def __init__(self, delivered: str, *, regenerate: bool) -> None:
        self.delivered = delivered
        self.pending = "" if regenerate else None

    @property
    def passing(self) -> bool:
        return self.pending is None

    def feed(self, text: str) -> str:
        if self.pending is None:
            return text
        self.pending += text
        if len(self.pending) < len(self.delivered):
            if not self.delivered.startswith(self.pending):
                raise ContinuationMismatch("the regenerated answer differs from the delivered text")
            return ""
        if not self.pending.startswith(self.delivered):
            raise ContinuationMismatch("the regenerated answer differs from the delivered text")
        rest, self.pending = self.pending[len(self.delivered) :], None
        return rest

    def finish(self) -> None:
        """The rescuer's answer ended: it must at least have covered the delivered text."""
        if self.pending is not None and self.pending != self.delivered:
            raise ContinuationMismatch("the regenerated answer is shorter than the delivered text")
