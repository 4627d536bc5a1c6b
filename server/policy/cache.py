"""The exact-match response cache.

    key         SHA-256 of a canonical form of the request: the endpoint and the body with its keys sorted,
                minus what does not change the answer (`stream`, `stream_options`, `user`), namespaced by org
                so one org never receives another's answer
    policy      per org: off, deterministic (temperature 0 or a seed; embeddings always) or all; and a TTL
    request     `X-Hatchway-Cache: bypass` (neither read nor store), `no-store` (read only), `ttl=SECONDS`
    value       the whole answer as the non-stream JSON body, whichever way it arrived: a stream is assembled
                into one, and a hit for a streaming request is replayed from it as a proper SSE stream
    bound       total bytes, least recently used entries evicted first
    owner       the event loop: every call runs on it (an admin's clear included), since lookups reorder and
                stores evict; a worker thread iterating the entries would race them
    shared      with `redis_url` set, server.shared.redis_cache.RedisCache holds the entries in Redis for every
                plane instead; the plane talks to either through `AnswerCache`, whose calls are coroutines

Only whole, successful answers are stored: a stream that broke, was rescued by another target or carried tool
calls is not.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from server.errors import InvalidRequestError

CACHE_MODES = ("off", "deterministic", "all")
HIT, MISS, BYPASS = "hit", "miss", "bypass"
# Body fields that do not change the answer.
_IGNORED = frozenset({"stream", "stream_options", "user"})
# Per-entry bookkeeping counted against the byte bound besides the value itself.
_ENTRY_OVERHEAD = 200


@dataclass(frozen=True, slots=True)
class CachePolicy:
    mode: str = "deterministic"
    ttl_s: int = 300


@dataclass(frozen=True, slots=True)
class Directives:
    bypass: bool = False
    no_store: bool = False
    ttl_s: int | None = None


NO_DIRECTIVES = Directives()


def parse_directives(header: str | None) -> Directives:
    """The X-Hatchway-Cache request header: comma-separated `bypass`, `no-store`, `ttl=SECONDS`."""
    if not header:
        return NO_DIRECTIVES
    bypass = no_store = False
    ttl: int | None = None
    for raw in header.split(","):
        item = raw.strip().lower()
        if item == "bypass":
            bypass = True
        elif item == "no-store":
            no_store = True
        elif item.startswith("ttl="):
            value = item[4:]
            # ASCII digits only, and few: int() refuses some Unicode digits ("²") and numbers past 4300 digits.
            if not (value.isascii() and value.isdigit()) or len(value) > 9:
                raise InvalidRequestError("X-Hatchway-Cache: ttl must be a whole number of seconds", param="ttl")
            ttl = int(value)
        elif item:
            raise InvalidRequestError(
                f"X-Hatchway-Cache: unknown directive {item!r}; use bypass, no-store or ttl=SECONDS"
            )
    return Directives(bypass, no_store, ttl)


def is_deterministic(endpoint: str, body: dict[str, Any]) -> bool:
    if endpoint == "embeddings":
        return True
    return body.get("temperature") == 0 or body.get("seed") is not None


def request_key(org_id: str, endpoint: str, body: dict[str, Any]) -> str:
    canonical = {k: v for k, v in body.items() if k not in _IGNORED}
    digest = hashlib.sha256(endpoint.encode() + b"\0" + orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
    return f"{org_id}:{digest.hexdigest()}"


def entry_for(
    org_id: str, endpoint: str, body: dict[str, Any], policy: CachePolicy, directives: Directives
) -> tuple[str, int] | None:
    """The key a request's answer is cached under and the TTL to store it with (0: read only), or None when the
    request bypasses the cache (by header, by the org's mode, or not deterministic enough for it)."""
    if directives.bypass or policy.mode == "off":
        return None
    if policy.mode == "deterministic" and not is_deterministic(endpoint, body):
        return None
    ttl = 0 if directives.no_store else directives.ttl_s if directives.ttl_s is not None else policy.ttl_s
    return request_key(org_id, endpoint, body), ttl


def entry_size(key: str, value: bytes) -> int:
    """What an entry counts against the byte bound."""
    return len(key) + len(value) + _ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache said about one request: its status, the key to store under, and the answer on a hit."""

    status: str
    key: str | None = None
    value: bytes | None = None
    ttl_s: int = 0

    @property
    def stores(self) -> bool:
        return self.key is not None and self.ttl_s > 0


BYPASSED = Lookup(BYPASS)


class AnswerCache(Protocol):
    """What the plane asks of a response cache, in process (ResponseCache) or shared through Redis
    (server.shared.redis_cache.RedisCache). Coroutines, since a shared cache answers over the network; none
    raises for a cache that cannot answer: a lookup is a miss, a store is skipped. The counters are this
    plane's, whichever cache holds the entries."""

    hits: int
    misses: int
    stores: int
    evictions: int

    async def fetch(
        self, org_id: str, endpoint: str, body: dict[str, Any], policy: CachePolicy, directives: Directives
    ) -> Lookup: ...

    async def store(self, key: str, value: bytes, ttl_s: int) -> None: ...

    async def remove(self, org_id: str | None = None) -> int:
        """Drop one org's entries, or every org's; how many went."""
        ...

    async def held(self, org_ids: Iterable[str]) -> dict[str, tuple[int, int] | None]:
        """Entries and bytes each org holds (None: unknown right now)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _Entry:
    value: bytes
    expires: float
    size: int


@dataclass
class ResponseCache:
    max_bytes: int
    clock: Callable[[], float] = time.monotonic
    entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    size: int = 0
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0

    # -- AnswerCache: this process's entries need no waiting, the coroutines only share the shared cache's shape

    async def fetch(
        self, org_id: str, endpoint: str, body: dict[str, Any], policy: CachePolicy, directives: Directives
    ) -> Lookup:
        return self.lookup(org_id, endpoint, body, policy, directives)

    async def store(self, key: str, value: bytes, ttl_s: int) -> None:
        self.put(key, value, ttl_s)

    async def remove(self, org_id: str | None = None) -> int:
        return self.clear(org_id)

    async def held(self, org_ids: Iterable[str]) -> dict[str, tuple[int, int] | None]:
        wanted = {org_id: [0, 0] for org_id in org_ids}
        for key, entry in self.entries.items():
            figures = wanted.get(key.rpartition(":")[0])
            if figures is not None:
                figures[0] += 1
                figures[1] += entry.size
        return {org_id: (entries, size) for org_id, (entries, size) in wanted.items()}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # -- the entries ------------------------------------------------------------------------------------

    def lookup(
        self, org_id: str, endpoint: str, body: dict[str, Any], policy: CachePolicy, directives: Directives
    ) -> Lookup:
        entry = entry_for(org_id, endpoint, body, policy, directives) if self.max_bytes > 0 else None
        if entry is None:
            return BYPASSED
        key, ttl = entry
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return Lookup(HIT, key, value, ttl)
        self.misses += 1
        return Lookup(MISS, key, None, ttl)

    def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: bytes, ttl_s: int) -> None:
        size = entry_size(key, value)
        if ttl_s <= 0 or size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = _Entry(value, self.clock() + ttl_s, size)
        self.size += size
        self.stores += 1
        while self.size > self.max_bytes:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.evictions += 1

    def clear(self, org_id: str | None = None) -> int:
        """Drop every entry, or one org's; returns how many went. On the event loop, like every other call."""
        if org_id is None:
            removed = len(self.entries)
            self.entries.clear()
            self.size = 0
            return removed
        doomed = [k for k in self.entries if k.startswith(f"{org_id}:")]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self.size -= entry.size


# -- streams in and out of the cache -------------------------------------------------------------------


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    role: str = "assistant"
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass
class StreamAssembler:
    """Builds the non-stream answer from the chunks of a stream, to cache it. `storable` turns False for what
    a plain concatenation cannot rebuild faithfully (tool calls, refusals, logprobs)."""

    chat: bool
    id: str | None = None
    created: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    usage: dict[str, Any] | None = None
    choices: dict[int, _Choice] = field(default_factory=dict)
    storable: bool = True

    def observe(self, chunk: dict[str, Any]) -> None:
        if self.id is None:
            self.id, self.created, self.model = chunk.get("id"), chunk.get("created"), chunk.get("model")
            self.system_fingerprint = chunk.get("system_fingerprint")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for raw in chunk.get("choices") or ():
            if not isinstance(raw, dict):
                continue
            if raw.get("logprobs") is not None:
                self.storable = False  # a concatenation of the text would drop them
            index = raw.get("index", 0)
            if not isinstance(index, int):
                self.storable = False  # nothing to file this choice's text under
                continue
            choice = self.choices.get(index)
            if choice is None:
                choice = self.choices[index] = _Choice()
            if raw.get("finish_reason"):
                choice.finish_reason = raw["finish_reason"]
            if self.chat:
                delta = raw.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call") or delta.get("refusal"):
                    self.storable = False
                if isinstance(delta.get("role"), str):
                    choice.role = delta["role"]
                if isinstance(delta.get("content"), str):
                    choice.text.append(delta["content"])
            elif isinstance(raw.get("text"), str):
                choice.text.append(raw["text"])

    def body(self) -> bytes | None:
        """The assembled answer, or None when it cannot be stored."""
        if not self.storable or not self.choices or any(c.finish_reason is None for c in self.choices.values()):
            return None
        choices: list[dict[str, Any]] = []
        for index, choice in sorted(self.choices.items()):
            text = "".join(choice.text)
            if self.chat:
                message = {"role": choice.role, "content": text}
                choices.append({"index": index, "message": message, "finish_reason": choice.finish_reason})
            else:
                choices.append({"index": index, "text": text, "finish_reason": choice.finish_reason})
        doc: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.system_fingerprint:
            doc["system_fingerprint"] = self.system_fingerprint
        if self.usage is not None:
            doc["usage"] = self.usage
        return orjson.dumps(doc)


def replay_chunks(body: bytes, *, chat: bool, include_usage: bool) -> list[bytes]:
    """A cached answer as the SSE data payloads of a stream (without `[DONE]`): content first, then a finish
    chunk per choice, then usage when the client asked for it."""
    doc = orjson.loads(body)
    base = {
        "id": doc.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": doc.get("created"),
        "model": doc.get("model"),
    }
    if doc.get("system_fingerprint"):
        base["system_fingerprint"] = doc["system_fingerprint"]
    payloads = []
    for choice in doc.get("choices") or ():
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            delta = {k: v for k, v in message.items() if v is not None}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
            # The answer's logprobs come with its text, in one chunk as the text does.
            first = {"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        else:
            text, logprobs = choice.get("text", ""), choice.get("logprobs")
            first = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}
        payloads.append(orjson.dumps({**base, "choices": [first]}))
        payloads.append(orjson.dumps({**base, "choices": [last]}))
    if include_usage and isinstance(doc.get("usage"), dict):
        payloads.append(orjson.dumps({**base, "choices": [], "usage": doc["usage"]}))
    return payloads
