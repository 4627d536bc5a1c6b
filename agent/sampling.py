"""How a node samples: the OpenAI sampling parameters of a request, and the token loop that honours them.

`parse` reads and checks the parameters (a wrong or unsupported one raises InvalidParameter naming it):

    max_tokens / max_completion_tokens   per choice; 0 only on /v1/completions (nothing generated: with
                                         `echo`, prompt scoring)
    temperature, top_p, top_k, min_p     llama.cpp's samplers, in llama-cpp-python's order
    presence_penalty, frequency_penalty  llama.cpp's penalties sampler, over the last LAST_N tokens generated
    repeat_penalty                       the same sampler's multiplicative penalty (a llama-server extension)
    seed                                 the seed of the sampling RNG: the same seed, prompt and parameters give
                                         the same text; choice i of `n` samples with seed + i
    stop                                 matched on the decoded text (StopScanner), across token boundaries
    n                                    choices, generated one after another on the same slot (the prompt is
                                         evaluated once and stays cached between them)
    logit_bias                           llama.cpp's logit-bias sampler; -100 bans the token outright
    logprobs, top_logprobs (chat)        the raw log probability of each token and the `top_logprobs` most likely
    logprobs (completions), echo         ones, from the model's logits before any sampler changed them
    suffix, best_of > n                  refused: llama.cpp offers no insertion for most models, and ranking
                                         hidden candidates is not done here

llama-cpp-python's `create_completion` hides the token ids it samples and computes logprobs only for contexts
built with `logits_all` (a full vocabulary row of scores per context position: 400 MB per slot for a 49k vocabulary
and a 2k context), so `Generation` runs the loop itself, as `Llama.generate` does: evaluate, sample with the same
sampler chain, decode. Each token's logprobs come from the logits of the position it was sampled from, which the
context still holds right after sampling. Echoed prompt tokens are scored by evaluating the prompt with logits at
every position (`score_prompt`), in chunks small enough that their logits stay a few MB.
"""

from __future__ import annotations

import codecs
import ctypes
import math
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import Llama
from llama_cpp._internals import LlamaSampler
from llama_cpp.llama_grammar import LlamaGrammar

from agent.grammar import GrammarChain

CHAT = "chat/completions"
# llama.cpp reads this seed as "pick one at random", so a client seed must never map onto it.
RANDOM_SEED = 0xFFFFFFFF
# OpenAI's bounds: `n` up to 128, `top_logprobs` up to 20 (legacy `logprobs` up to 5; nodes take 20 there too),
# `logit_bias` values from -100 to 100.
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
# Positions of an echoed prompt scored per decode: each keeps a vocabulary row of logits (200 KB for 49k tokens).
SCORE_CHUNK_TOKENS = 64
# Echoed prompt logprobs go out in runs of this many tokens, so that no one batch to the plane grows with the prompt.
ECHO_RUN_TOKENS = 256
# The plane ends the session of a node whose events for one job pass 32 MiB (server.nodes.bounds.MAX_JOB_BYTES),
# every other job with it: a request whose logprobs could pass three quarters of that is refused. A token or an
# alternative costs about 13 bytes on the wire (its few bytes, a float, the framing); 16 leaves room for long ones.
LOGPROB_BUDGET_BYTES = 24 * 1024 * 1024
LOGPROB_WIRE_BYTES = 16


class InvalidParameter(ValueError):
    """A sampling parameter the node refuses; the message starts with the parameter's name in quotes."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"'{param}' {problem}")
        self.param = param


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log probability, and the most likely tokens at its position (as many as the request asked).

    `logprob` is None for the first token of an echoed prompt, which nothing predicts."""

    token: bytes
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Sampling:
    """The parameters of one request, checked; `logprobs` is how many alternatives to list per token (None: no
    logprobs at all)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    seed: int
    stop: tuple[str, ...]
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    logit_bias: tuple[tuple[int, float], ...] = field(default=())

    def seed_of(self, choice: int) -> int:
        """Choice i samples with seed + i: the choices differ, and each is reproducible."""
        return (self.seed + choice) % RANDOM_SEED

    def limit(self, prompt_tokens: int, context: int) -> int:
        """Tokens one choice may generate: max_tokens, and never past the context (as llama-cpp-python caps it)."""
        room = context - prompt_tokens
        return room if self.max_tokens is None else min(self.max_tokens, room)


# --- parameters -------------------------------------------------------------------------------------------------


def parse(endpoint: str, body: Mapping[str, Any], random_seed: Callable[[], int]) -> Sampling:
    """The sampling parameters of `body` for `endpoint` ("chat/completions" or "completions").

    `random_seed` picks the seed of a request that names none. Raises InvalidParameter."""
    chat = endpoint == CHAT
    _refuse_unsupported(chat, body)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        # A legacy completion may ask for nothing at all: with `echo`, that scores the prompt.
        max_tokens = _integer(body, "max_tokens", 1 if chat else 0)
    n = _integer(body, "n", 1) or 1
    if n > MAX_CHOICES:
        raise InvalidParameter("n", f"must be at most {MAX_CHOICES}, got {n}")
    if not chat:
        best_of = _integer(body, "best_of", 1)
        if best_of is not None and best_of < n:
            raise InvalidParameter("best_of", f"must be at least 'n' ({n}), got {best_of}")
    seed = _integer(body, "seed", None)
    top_k = _integer(body, "top_k", 0)
    return Sampling(
        max_tokens=max_tokens,
        # OpenAI's defaults for OpenAI's parameters; llama.cpp's for the extensions llama-server also accepts.
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=40 if top_k is None else top_k,
        min_p=_number(body, "min_p", 0.05, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 10.0),
        seed=(seed if seed is not None else random_seed()) % RANDOM_SEED,
        stop=_stops(body),
        n=n,
        logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body),
        echo=False if chat else _flag(body, "echo"),
        logit_bias=_logit_bias(body),
    )


def _refuse_unsupported(chat: bool, body: Mapping[str, Any]) -> None:
    """What llama.cpp nodes cannot honour is refused rather than answered with something the client did not ask."""
    if chat:
        for name, harmless in (("echo", (None, False)), ("suffix", (None, "")), ("best_of", (None, 1))):
            if body.get(name) not in harmless:
                raise InvalidParameter(name, "is a /v1/completions parameter, not a chat one")
        return
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise InvalidParameter("suffix", "is not supported on llama.cpp nodes (no fill-in-the-middle)")
    best_of, n = body.get("best_of"), body.get("n")
    if isinstance(best_of, int) and not isinstance(best_of, bool) and best_of > (n if isinstance(n, int) else 1):
        raise InvalidParameter("best_of", "greater than 'n' is not supported on llama.cpp nodes")


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    wanted = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise InvalidParameter("top_logprobs", f"must be at most {MAX_TOP_LOGPROBS}, got {top}")
    if top is not None and not wanted:
        raise InvalidParameter("top_logprobs", "needs 'logprobs': true")
    return (top or 0) if wanted else None


def _completion_logprobs(body: Mapping[str, Any]) -> int | None:
    if body.get("top_logprobs") is not None:
        raise InvalidParameter("top_logprobs", "is a chat parameter: /v1/completions takes 'logprobs' as a number")
    top = _integer(body, "logprobs", 0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise InvalidParameter("logprobs", f"must be at most {MAX_TOP_LOGPROBS}, got {top}")
    return top


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """Token ids (as JSON object keys) to biases; -100 becomes a ban, as OpenAI describes it. The ids are checked
    against the vocabulary once the model is known (`check_logit_bias`)."""
    raw = body.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise InvalidParameter("logit_bias", "must be an object of token ids to numbers")
    biases: list[tuple[int, float]] = []
    for key, value in raw.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10 else None
        if token is None:
            raise InvalidParameter("logit_bias", f"keys must be token ids, got {str(key)[:32]!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS
        ):
            raise InvalidParameter("logit_bias", f"values must be numbers from -100 to 100, got {str(value)[:32]}")
        biases.append((token, -math.inf if value <= -MAX_LOGIT_BIAS else float(value)))
    return tuple(biases)


def check_for_model(sampling: Sampling, vocabulary: int, prompt_tokens: int, context: int) -> None:
    """What only the model and the prompt tell: logit_bias ids within the vocabulary, logprobs within budget."""
    for token, _ in sampling.logit_bias:
        if token >= vocabulary:
            raise InvalidParameter("logit_bias", f"token ids must be below {vocabulary}, got {token}")
    if sampling.logprobs is not None:
        tokens = sampling.n * (sampling.limit(prompt_tokens, context) + (prompt_tokens if sampling.echo else 0))
        if tokens * (1 + sampling.logprobs) * LOGPROB_WIRE_BYTES > LOGPROB_BUDGET_BYTES:
            raise InvalidParameter(
                "logprobs",
                f"for {tokens} tokens ({sampling.n} choices) is more than a node sends for one request: "
                "lower max_tokens, n or the number of alternatives",
            )


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParameter(key, "must be a boolean")
    return value


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(key, "must be a number")
    if not low <= value <= high:
        raise InvalidParameter(key, f"must be between {low} and {high}, got {value}")
    return float(value)


def _integer(body: Mapping[str, Any], key: str, low: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(key, "must be an integer")
    if low is not None and value < low:
        raise InvalidParameter(key, f"must be at least {low}, got {value}")
    return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
        raise InvalidParameter("stop", "must be a string or a list of strings")
    return tuple(item for item in stop if item)


# --- the token loop, on the job's worker thread -----------------------------------------------------------------

Emit = Callable[[str, tuple[TokenLogprob, ...], int], None]  # (text, its tokens' logprobs, choice index)


def run_choice(
    llama: Llama,
    prompt: Sequence[int],
    sampling: Sampling,
    index: int,
    emit: Emit,
    should_stop: Callable[[], bool],
    grammar: LlamaGrammar | None = None,
) -> ChoiceEnd:
    """Generate choice `index` after `prompt`, all of which but its last token `llama` holds evaluated; hand its
    text to `emit` as it comes, stop strings held back and cut (StopScanner), each piece with the logprobs of the
    tokens it holds when the request asked for them.

    Counts every sampled token but an end-of-generation one, which ends the choice unseen (as llama-cpp-python
    counts): a stop string's tokens count, though their text is never sent."""
    limit = sampling.limit(len(prompt), llama.n_ctx())
    if limit <= 0:
        return ChoiceEnd(index, "length", 0)
    generation = Generation(llama, sampling, seed=sampling.seed_of(index), limit=limit, grammar=grammar)
    scanner = StopScanner(sampling.stop)
    pending = PendingLogprobs()
    decoded = emitted = 0  # characters of text decoded, and sent
    finish = "cancelled"
    steps = generation.steps(prompt[-1:])
    try:
        for step in steps:
            if step.logprob is not None:
                pending.add(decoded, step.logprob)
            decoded += len(step.text)
            text, matched = scanner.feed(step.text)
            emitted += len(text)
            # A piece carries the tokens that begin within the text sent so far (a token split by a stop string
            # included, the stop string's own tokens not).
            if text:
                emit(text, pending.before(emitted), index)
            if matched:
                finish = "stop"
                break
            if should_stop():
                break
        else:
            text, matched = scanner.feed(generation.flush())
            if not matched:
                text += scanner.flush()
            emitted += len(text)
            # The end: every token's logprobs go out, with the last text or alone (tokens that decode to nothing).
            rest = pending.before(emitted) if matched else pending.all()
            if text or rest:
                emit(text, rest, index)
            finish = "stop" if matched else generation.finish_reason
    finally:
        steps.close()
        generation.close()
    return ChoiceEnd(index, finish, generation.tokens)


@dataclass(frozen=True, slots=True)
class Step:
    """One sampled token: the text it completes (empty while a UTF-8 character is split across tokens), and its
    logprobs when asked for."""

    text: str
    logprob: TokenLogprob | None


class Generation:
    """One choice's tokens: llama.cpp's sampler chain as llama-cpp-python's `Llama._init_sampler` builds it (plus
    logit_bias and an optional grammar), the same seed giving the same tokens as `create_completion`.

    `tokens` counts the tokens sampled; `finish_reason` is "stop" once an end-of-generation token came, else
    "length". Parameters: the slot's `llama`, the request's `sampling`, the choice's `seed`, the most tokens to
    sample (`limit`), and a `grammar` that constrains them."""

    def __init__(
        self, llama: Llama, sampling: Sampling, *, seed: int, limit: int, grammar: LlamaGrammar | None = None
    ) -> None:
        self.tokens = 0
        self.finish_reason = "length"
        self._llama = llama
        self._limit = limit
        self._top = sampling.logprobs
        self._vocab = llama._model.vocab
        self._n_vocab = llama.n_vocab()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._sampler = _sampler_chain(llama, sampling, seed, grammar)

    def steps(self, pending: Sequence[int]) -> Generator[Step, None, None]:
        """Evaluate `pending` (the prompt's last token), then sample, yield, and evaluate each token in turn. The
        last token yielded is never evaluated: closing the iterator after it costs no decode."""
        llama = self._llama
        tokens = list(pending)
        while self.tokens < self._limit:
            llama.eval(tokens)
            token = self._sampler.sample(llama._ctx, -1)
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                self.finish_reason = "stop"
                return
            self.tokens += 1
            piece = token_bytes(self._vocab, token)
            logprob = None
            if self._top is not None:
                row = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(self._n_vocab,))
                logprob = logprob_of(row, token, piece, self._top, self._vocab)
            yield Step(self._decoder.decode(piece), logprob)
            tokens = [token]

    def flush(self) -> str:
        """What the decoder still holds at the end: an incomplete UTF-8 character, as U+FFFD."""
        return self._decoder.decode(b"", final=True)

    def close(self) -> None:
        self._sampler.close()


def _sampler_chain(
    llama: Llama, sampling: Sampling, seed: int, grammar: LlamaGrammar | None
) -> LlamaSampler | GrammarChain:
    chain = LlamaSampler()  # type: ignore[no-untyped-call]
    n_vocab = llama.n_vocab()
    if sampling.logit_bias:
        chain.add_logit_bias(n_vocab, dict(sampling.logit_bias))
    chain.add_penalties(
        n_vocab=n_vocab,
        penalty_last_n=llama.last_n_tokens_size,
        penalty_repeat=sampling.repeat_penalty,
        penalty_freq=sampling.frequency_penalty,
        penalty_present=sampling.presence_penalty,
    )
    if sampling.temperature == 0.0:
        chain.add_greedy()  # type: ignore[no-untyped-call]
    else:
        chain.add_top_k(sampling.top_k)
        chain.add_typical(1.0, 1)
        chain.add_top_p(sampling.top_p, 1)
        chain.add_min_p(sampling.min_p, 1)
        chain.add_temp(sampling.temperature)
        chain.add_dist(seed)
    # A grammar is applied to the vocabulary only when the chain's pick breaks it (agent.grammar).
    return chain if grammar is None else GrammarChain(llama, chain, grammar)


class PendingLogprobs:
    """Token logprobs waiting for their text to be sent, each with the offset (in characters of the decoded text)
    where its token begins."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, TokenLogprob]] = []

    def add(self, start: int, entry: TokenLogprob) -> None:
        self._entries.append((start, entry))

    def before(self, emitted: int) -> tuple[TokenLogprob, ...]:
        """Take the entries of the tokens that begin before character `emitted`."""
        count = 0
        while count < len(self._entries) and self._entries[count][0] < emitted:
            count += 1
        taken = tuple(entry for _, entry in self._entries[:count])
        del self._entries[:count]
        return taken

    def all(self) -> tuple[TokenLogprob, ...]:
        taken = tuple(entry for _, entry in self._entries)
        self._entries.clear()
        return taken


class StopScanner:
    """Finds stop strings across piece boundaries, holding back text that could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to emit, and whether a stop string was reached (its text is dropped)."""
        text = self._held + piece
        found = [index for index in (text.find(stop) for stop in self._stops) if index >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = self._partial_match(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_match(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


# --- logprobs -----------------------------------------------------------------------------------------------------


def logprob_of(
    row: npt.NDArray[np.float32], token: int, piece: bytes, top: int, vocab: llama_cpp.llama_vocab_p
) -> TokenLogprob:
    """`token`'s log probability under the logits `row`, and the `top` most likely tokens (rendered with their
    special tokens' text, so that an end-of-turn token shows as such)."""
    peak = float(row.max())
    norm = peak + math.log(float(np.exp(row - peak, dtype=np.float32).sum()))
    alternatives: tuple[TopLogprob, ...] = ()
    if top:
        best = np.argpartition(row, -top)[-top:]
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = tuple(TopLogprob(token_bytes(vocab, int(i), special=True), float(row[i]) - norm) for i in best)
    return TokenLogprob(piece, float(row[token]) - norm, alternatives)


def score_prompt(
    llama: Llama, prompt: Sequence[int], pieces: Sequence[bytes], top: int, should_stop: Callable[[], bool]
) -> list[TokenLogprob] | None:
    """Evaluate all of `prompt` but its last token from the start, with logits at every position: each prompt
    token's logprob given those before it (None for the first). `pieces` are the tokens' bytes. None if stopped
    between two chunks.

    The slot's cache is dropped first: the logits of the positions it held are gone."""
    forget(llama)
    vocab = llama._model.vocab
    n_vocab = llama.n_vocab()
    entries = [TokenLogprob(pieces[0], None)]
    end = len(prompt) - 1
    size = max(1, min(SCORE_CHUNK_TOKENS, llama.n_batch))
    for start in range(0, end, size):
        if should_stop():
            return None
        chunk = list(prompt[start : min(end, start + size)])
        rows = _eval_with_logits(llama, chunk, n_vocab)
        for offset in range(len(chunk)):
            position = start + offset + 1
            entries.append(logprob_of(rows[offset], prompt[position], pieces[position], top, vocab))
    return entries


def _eval_with_logits(llama: Llama, tokens: list[int], n_vocab: int) -> npt.NDArray[np.float32]:
    """`Llama.eval` of a batch, with the logits of every position kept (it keeps only the last one's unless the
    context was built with logits_all). The rows stay valid until the next decode."""
    n_past = llama.n_tokens
    llama._ctx.kv_cache_seq_rm(-1, n_past, -1)
    llama._batch.set_batch(batch=tokens, n_past=n_past, logits_all=True)
    llama._ctx.decode(llama._batch)
    llama.input_ids[n_past : n_past + len(tokens)] = tokens
    llama.n_tokens += len(tokens)
    logits = llama._ctx.get_logits()  # type: ignore[no-untyped-call]
    return np.ctypeslib.as_array(logits, shape=(len(tokens), n_vocab))


def forget(llama: Llama) -> None:
    """Drop everything the slot holds."""
    llama._ctx.kv_cache_seq_rm(-1, 0, -1)
    llama.n_tokens = 0


def prompt_pieces(llama: Llama, prompt: Sequence[int], text: str | None) -> list[bytes]:
    """The bytes of each prompt token as an echo shows them: special tokens by their text (a prompt names them as
    text), a BOS the tokenizer added by nothing, and the first word without the space a SentencePiece vocabulary
    puts before it unless the prompt has one. `text` is the prompt as the client sent it (None: token ids)."""
    vocab = llama._model.vocab
    pieces: list[bytes] = []
    first = True
    for position, token in enumerate(prompt):
        if text is not None and position == 0 and token == llama.token_bos() and not _starts_with_bos(llama, text):
            pieces.append(b"")
            continue
        strip = 1 if first and text is not None and not text.startswith(" ") else 0
        pieces.append(token_bytes(vocab, token, special=True, lstrip=strip))
        first = False
    return pieces


def _starts_with_bos(llama: Llama, text: str) -> bool:
    head = llama.tokenize(text.encode("utf-8")[:64], add_bos=False, special=True)[:1]
    return head == [llama.token_bos()]


def echo_runs(text: str, entries: Sequence[TokenLogprob] | None) -> Iterator[tuple[str, tuple[TokenLogprob, ...]]]:
    """An echoed prompt as pieces to emit: its text with the first ECHO_RUN_TOKENS logprobs, then the rest of
    them in runs with no text."""
    if not entries:
        yield text, ()
        return
    for start in range(0, len(entries), ECHO_RUN_TOKENS):
        yield (text if start == 0 else ""), tuple(entries[start : start + ECHO_RUN_TOKENS])


_PIECE_BYTES = 64


def token_bytes(vocab: llama_cpp.llama_vocab_p, token: int, special: bool = False, lstrip: int = 0) -> bytes:
    """The bytes of one token (llama-cpp-python's own `token_to_piece` returns its 32-byte buffer, padding and
    all, and cuts longer pieces)."""
    buffer = ctypes.create_string_buffer(_PIECE_BYTES)
    size = llama_cpp.llama_token_to_piece(vocab, token, buffer, _PIECE_BYTES, lstrip, special)
    if size < 0:
        buffer = ctypes.create_string_buffer(-size)
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, -size, lstrip, special)
    return buffer.raw[: max(size, 0)]
