"""Mid-stream rescue: what a committed stream has delivered, and how a fallback continues it.

`StreamProgress` watches the chunks relayed to the client: the text delivered so far, whether the answer
finished, and whether it can be rescued at all (one choice of plain text: tool-call streams and `n > 1` cannot
be stitched together honestly). When the stream breaks, a fallback target is asked to continue it in the form
the target is known to support, its *continuation* (a provider's `--continuation` setting):

    regenerate   the default for a provider. The original request again; the new answer is held back until it
                 is as long as the delivered text, must begin with exactly that text (character for character,
                 whitespace included: no trimming or normalisation), and only what follows it is passed on.
                 Any other answer ends the rescue on that target (`ContinuationMismatch`)
    prefill      the delivered text as a final assistant message (chat) or appended to the prompt
                 (completions), for servers known to continue it (llama.cpp's server, say). Checked where it
                 can be: an answer that begins with the whole delivered text was a new answer after all (the
                 server ignored the prefill) and is trimmed like a regeneration; any other answer is trusted
                 to be the continuation
    vllm         `prefill` in vLLM's form: chat requests also carry `continue_final_message: true` and
                 `add_generation_prompt: false`, without which vLLM opens a new assistant turn
    none         the provider is never asked to rescue a stream
    exact        node pools only: the agent renders the chat template without the generation prompt and appends
                 the delivered text, so what it generates is the continuation itself; passed on unchecked

Nothing is learnt from a target's answer: a 200 to a prefill request proves nothing (OpenAI's own API answers
one with a new message), so a provider's form is what the operator declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ContinuationForm = Literal["regenerate", "prefill", "vllm", "none", "exact"]
# What a provider may declare (`exact` is what the plane's own node pools do), the default first.
PROVIDER_CONTINUATIONS: tuple[ContinuationForm, ...] = ("regenerate", "prefill", "vllm", "none")
DEFAULT_CONTINUATION: ContinuationForm = "regenerate"


def provider_continuation(value: str) -> ContinuationForm:
    """A stored `continuation` setting as a form; anything unknown is the safe default, never a prefill."""
    return next((form for form in PROVIDER_CONTINUATIONS if form == value), DEFAULT_CONTINUATION)


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


def rescue_request(
    body: dict[str, Any], progress: StreamProgress, form: ContinuationForm
) -> tuple[dict[str, Any], Continuation]:
    """The body that asks a target to continue the delivered answer in `form`, and what checks its text."""
    if form != "regenerate":
        continued = prefill_body(body, progress, vllm=form == "vllm")
        if continued is not None:
            return continued, Continuation(progress.delivered, "trust" if form == "exact" else "verify")
    return body, Continuation(progress.delivered, "regenerate")


def prefill_body(body: dict[str, Any], progress: StreamProgress, *, vllm: bool = False) -> dict[str, Any] | None:
    """The request that asks a target to continue the delivered text, or None when there is no such form."""
    delivered = progress.delivered
    continued: dict[str, Any] = dict(body)
    if progress.chat:
        continued["messages"] = [*body["messages"], {"role": "assistant", "content": delivered}]
        if vllm:
            continued["continue_final_message"] = True
            continued["add_generation_prompt"] = False
    elif isinstance(body.get("prompt"), str):
        continued["prompt"] = body["prompt"] + delivered
    else:
        return None
    # What was delivered counts against the client's budget (one token per content chunk, as servers send).
    for limit in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(limit), int):
            continued[limit] = max(1, body[limit] - progress.content_chunks)
    return continued


CheckMode = Literal["regenerate", "verify", "trust"]


class Continuation:
    """Turns a rescuing target's text into what the client still lacks.

    regenerate  the answer restarts from the beginning: it is held back until it is as long as the delivered
                text, must begin with exactly that text, and only the rest is passed on
    verify      a prefill continuation, held back the same way: when it begins with the whole delivered text
                the target answered anew and it is trimmed as a regeneration; as soon as it differs it is a
                continuation, passed on whole
    trust       an exact continuation (a node pool's), passed on as it comes
    """

    def __init__(self, delivered: str, mode: CheckMode) -> None:
        self.delivered = delivered
        self.mode = mode
        # The text held back while it could still be a restart of the delivered answer (None: passing).
        self.pending: str | None = "" if mode != "trust" and delivered else None

    @property
    def passing(self) -> bool:
        return self.pending is None

    @property
    def prefilled(self) -> bool:
        """Whether the request carried the delivered text (a prefill), rather than asking for a new answer."""
        return self.mode != "regenerate"

    def feed(self, text: str) -> str:
        if self.pending is None:
            return text
        self.pending += text
        if len(self.pending) < len(self.delivered) and self.delivered.startswith(self.pending):
            return ""  # could still be the delivered answer again: wait for more
        if self.pending.startswith(self.delivered):
            return self._release(len(self.delivered))  # a new answer: only what follows the delivered text
        if self.mode == "regenerate":
            raise ContinuationMismatch("the regenerated answer differs from the delivered text")
        return self._release(0)  # not a restart: a continuation

    def finish(self) -> str:
        """The rescuer's answer ended: what is still held back and belongs to the client."""
        if self.pending is None:
            return ""
        if self.pending == self.delivered:
            return self._release(len(self.delivered))  # the same answer again, nothing more
        if self.mode == "regenerate":
            raise ContinuationMismatch("the regenerated answer is shorter than the delivered text")
        return self._release(0)  # too short to be a restart: a (short) continuation

    def _release(self, start: int) -> str:
        rest = (self.pending or "")[start:]
        self.pending = None
        return rest
