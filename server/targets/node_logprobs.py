"""A node's logprobs (TokenBatch.logprobs) in OpenAI's shapes, one `ChoiceLogprobs` per choice of an answer.

    chat          choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
                  bytes}]}], "refusal": null}
    completions   choices[].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}: top_logprobs maps the
                  most likely tokens' text (and the sampled token's, as OpenAI adds it) to their logprobs, both null
                  for the first token of an echoed prompt; text_offset is where each token begins, in characters of
                  the prompt and the choice's text, as OpenAI counts it (an echo's tokens from 0, else from the
                  prompt's length; a prompt of token ids counts as empty)

A token's text is its bytes as UTF-8, or "bytes:\\xNN..." when they hold part of a character, as OpenAI writes
such tokens. The plane lists at most as many alternatives as the request asked for, whatever the node sent.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Any

from proto.hatchway.node.v1 import node_pb2 as pb

CHAT = "chat/completions"


def requested(endpoint: str, body: dict[str, Any]) -> int | None:
    """How many alternatives per token the request asked for, or None when it asked for no logprobs."""
    logprobs = body.get("logprobs")
    if endpoint == CHAT:
        if logprobs is not True:
            return None
        top = body.get("top_logprobs")
        return top if _count(top) else 0
    return logprobs if _count(logprobs) else None


def first_offset(body: dict[str, Any]) -> int:
    """The text_offset of a legacy completion's first token: 0 with `echo`, else past the prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return len(prompt) if isinstance(prompt, str) and not body.get("echo") else 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def token_text(token: bytes) -> str:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in token)


class ChoiceLogprobs:
    """One choice's logprobs: `add` turns a batch's entries into the fragment its chunk carries and keeps them for
    `whole`, the logprobs of a non-streamed answer. Parameters: `chat` (else a legacy completion), `top` (the
    alternatives asked for), `offset` (a legacy completion's first text_offset)."""

    def __init__(self, chat: bool, top: int, offset: int = 0) -> None:
        self.chat = chat
        self.top = top
        self._content: list[dict[str, Any]] = []
        self._legacy: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self._offset = offset  # characters before the next token
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, entries: Iterable[pb.TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            content = [self._chat_entry(entry) for entry in entries if entry.HasField("logprob")]
            self._content.extend(content)
            return {"content": content, "refusal": None}
        fragment = self._legacy_entries(entries)
        for name, values in fragment.items():
            self._legacy[name].extend(values)
        return fragment

    def whole(self) -> dict[str, Any]:
        if self.chat:
            return {"content": self._content, "refusal": None}
        return self._legacy

    def _chat_entry(self, entry: pb.TokenLogprob) -> dict[str, Any]:
        return {
            "token": token_text(entry.token),
            "logprob": entry.logprob,
            "bytes": list(entry.token),
            "top_logprobs": [
                {"token": token_text(top.token), "logprob": top.logprob, "bytes": list(top.token)}
                for top in entry.top[: self.top]
            ],
        }

    def _legacy_entries(self, entries: Iterable[pb.TokenLogprob]) -> dict[str, list[Any]]:
        tokens: list[str] = []
        logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for entry in entries:
            text = token_text(entry.token)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(entry.token))
            if entry.HasField("logprob"):
                logprobs.append(entry.logprob)
                top = {token_text(alternative.token): alternative.logprob for alternative in entry.top[: self.top]}
                top.setdefault(text, entry.logprob)
                tops.append(top)
            else:
                logprobs.append(None)
                tops.append(None)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
