"""A model's slots: one llama.cpp context each, lent to one job at a time, and the prompt each one has cached.

A job is promised a slot on the event loop (`Slots.reserve`: a model whose slots are all promised answers Busy at
once) and takes one on its worker thread once its prompt is tokenized (`Lease.take`). It takes the free slot whose
cached tokens share the longest prefix with its prompt, as llama.cpp's own server does, provided the prompt keeps at
least as many of that slot's cached tokens as it throws away; failing that, the slot used least recently (one never
used first). So a conversation's follow-up finds the slot that holds the conversation so far, and a new conversation
takes the stalest slot instead of the cache of the conversation served last.

The prompt is then evaluated in chunks (`prefill`), past the prefix the slot already holds, with a look at the job's
cancel between chunks: llama-cpp-python evaluates a whole prompt in one call that nothing interrupts, which kept a
slot busy for seconds after its client had gone. Each chunk is sized to take about `PREFILL_CHUNK_S`, from the pace
of the chunks before it: a few dozen tokens on a 2-core CPU, the whole batch (`n_batch`) on a GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama

# How long one chunk of prompt evaluation should take: a cancelled job stops within about this long. Each chunk is a
# decode of its own, and each decode has a fixed cost, so shorter chunks cost prompt throughput: 0.1 s is where the
# cost stayed small while a cancel still comes quickly (measured against 0.05 s chunks: bench/README.md).
PREFILL_CHUNK_S = 0.1
# The first chunk, before its pace is known, and the smallest: below it a decode is mostly that fixed cost.
PREFILL_FIRST_TOKENS = 16
PREFILL_MIN_TOKENS = 16


class Slots:
    """A model's llama.cpp contexts; see the module docstring. Thread-safe: promised on the loop, taken and given
    back on worker threads."""

    def __init__(self, llamas: Sequence[Llama]) -> None:
        self._all = list(llamas)
        self._free = list(llamas)
        self._promised = 0  # promised to jobs that have not taken their slot yet
        self._clock = 0
        self._last_used = {id(llama): 0 for llama in llamas}  # when each was given back, on _clock; 0: never
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return len(self._all)

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._all) - len(self._free) + self._promised

    @property
    def tokenizer(self) -> Llama:
        # Tokenizing reads only the model's vocabulary, which every slot shares and none changes, so a job can
        # tokenize with a context another job is decoding on (llama.cpp's server tokenizes on its HTTP threads).
        return self._all[0]

    def reserve(self) -> bool:
        """Promise a slot to a job that will `take` it or give the promise back (`release(None)`); False: none left."""
        with self._lock:
            if len(self._free) <= self._promised:
                return False
            self._promised += 1
            return True

    def take(self, tokens: Sequence[int]) -> Llama:
        """The free slot for a prompt of `tokens` (see the module docstring); needs a promise from `reserve`."""
        with self._lock:
            self._promised -= 1
            llama = self._choose(tokens)
            self._free.remove(llama)
            return llama

    def release(self, llama: Llama | None) -> None:
        """Give a slot back, or only the promise of one when the job never took it."""
        with self._lock:
            if llama is None:
                self._promised -= 1
                return
            self._clock += 1
            self._last_used[id(llama)] = self._clock
            self._free.append(llama)

    def close(self) -> None:
        for llama in self._all:
            llama.close()

    def _choose(self, tokens: Sequence[int]) -> Llama:
        best: Llama | None = None
        best_kept = 0
        if tokens and len(self._free) > 1:
            prompt = np.asarray(tokens, dtype=np.intc)
            for llama in self._free:
                cached = cached_tokens(llama)
                kept = common_prefix(cached, prompt)
                # Worth taking only where the prompt keeps at least what it discards: a new conversation that merely
                # shares a system prompt must not wipe out another conversation's long history.
                if kept > best_kept and 2 * kept >= len(cached):
                    best, best_kept = llama, kept
        if best is None:
            best = min(self._free, key=lambda llama: self._last_used[id(llama)])
        return best


class Lease:
    """A job's claim on one slot of a model: promised when the job starts, a slot once the job knows its prompt."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self.llama: Llama | None = None

    @property
    def tokenizer(self) -> Llama:
        return self.llama if self.llama is not None else self._slots.tokenizer

    def take(self, tokens: Sequence[int]) -> Llama:
        if self.llama is None:
            self.llama = self._slots.take(tokens)
        return self.llama

    def release(self) -> None:
        self._slots.release(self.llama)


def cached_tokens(llama: Llama) -> npt.NDArray[np.intc]:
    return llama.input_ids[: llama.n_tokens]


def common_prefix(a: npt.NDArray[np.intc], b: npt.NDArray[np.intc]) -> int:
    size = min(len(a), len(b))
    differ = np.flatnonzero(a[:size] != b[:size])
    return int(differ[0]) if differ.size else size


def keep_prefix(llama: Llama, tokens: Sequence[int]) -> int:
    """Drop what `llama` caches past its common prefix with all of `tokens` but the last; returns the tokens kept.

    The last prompt token is left for llama-cpp-python's `generate`, which finds the rest cached and evaluates only
    that one to sample from, as it would for any prompt whose prefix it holds."""
    prompt = np.asarray(tokens[:-1], dtype=np.intc)
    kept = common_prefix(cached_tokens(llama), prompt)
    if kept < llama.n_tokens:
        # The call llama-cpp-python's generate() makes for this. A cache that cannot be cut short (a recurrent
        # model's) is emptied: removing a whole sequence always works.
        if not llama._ctx.kv_cache_seq_rm(-1, kept, -1):
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            kept = 0
        llama.n_tokens = kept
    return kept


def prefill(llama: Llama, tokens: Sequence[int], should_stop: Callable[[], bool]) -> bool:
    """Evaluate all of `tokens` but the last past what `llama` holds, in chunks; False if stopped between two.

    `keep_prefix` must have run first: what the slot holds is then a prefix of `tokens`."""
    end = len(tokens) - 1
    start = llama.n_tokens
    size = PREFILL_FIRST_TOKENS
    while start < end:
        if should_stop():
            return False
        stop = min(end, start + size)
        began = time.perf_counter()
        llama.eval(tokens[start:stop])
        elapsed = time.perf_counter() - began
        # At most twice as large each time: one fast chunk (a CPU freed for a moment) must not make the next huge.
        paced = int((stop - start) * PREFILL_CHUNK_S / elapsed) if elapsed > 0 else llama.n_batch
        size = max(PREFILL_MIN_TOKENS, min(paced, 2 * size, llama.n_batch))
        start = stop
    return True
