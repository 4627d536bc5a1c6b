"""The work of a completion or chat job, run on the job's worker thread: the prompt into the slot, then the
choices generated (agent.tools, agent.sampling), their text handed to the job's channel."""

from __future__ import annotations

from llama_cpp import Llama

from agent import sampling as sampler
from agent import tools
from agent.engine.channel import _Channel
from agent.engine.errors import ContextLengthExceeded, InvalidRequest
from agent.engine.jobs import End
from agent.sampling import ChoiceEnd, Sampling, TokenLogprob
from agent.slots import Lease, keep_prefix, prefill


def _complete(
    lease: Lease,
    channel: _Channel,
    *,
    prompt: str | list[int],
    add_bos: bool,
    sampling: Sampling,
    output: tools.Output | None = None,
) -> End:
    tokens = _tokenize(lease.tokenizer, prompt, add_bos)
    context = lease.tokenizer.n_ctx()
    if not tokens:
        raise InvalidRequest("the prompt is empty")
    if len(tokens) >= context:
        raise ContextLengthExceeded(
            f"the prompt is {len(tokens)} tokens but a slot holds {context} tokens, completion included"
        )
    try:
        sampler.check_for_model(sampling, lease.tokenizer.n_vocab(), len(tokens), context)
    except sampler.InvalidParameter as exc:
        raise InvalidRequest(str(exc)) from exc
    if channel.should_stop():
        return End("cancelled", len(tokens), 0)
    llama = lease.take(tokens)
    text = prompt if isinstance(prompt, str) else None
    pieces = sampler.prompt_pieces(llama, tokens, text) if sampling.echo else []
    scored: list[TokenLogprob] | None = None
    if sampling.echo and sampling.logprobs is not None:
        # Scoring the prompt takes the logits of every position, which the slot's cache does not hold.
        cached = 0
        scored = sampler.score_prompt(llama, tokens, pieces, sampling.logprobs, channel.should_stop)
        if scored is None:
            return End("cancelled", len(tokens), 0)
    else:
        cached = keep_prefix(llama, tokens)
        # In chunks that a cancel stops between, all of it but the last token, which the generation evaluates to
        # sample the first token from.
        if not prefill(llama, tokens, channel.should_stop):
            return End("cancelled", len(tokens), 0, cached)
    echoed = text if text is not None else b"".join(pieces).decode("utf-8", errors="replace")
    ends: list[ChoiceEnd] = []
    for index in range(sampling.n):
        if index:
            keep_prefix(llama, tokens)  # back to the prompt, which the slot still holds but for its last token
        if sampling.echo:
            for piece, logprobs in sampler.echo_runs(echoed, scored):
                channel.text(piece, logprobs, index)
        ends.append(tools.run_choice(llama, tokens, sampling, index, channel.text, channel.should_stop, output))
        if ends[-1].finish_reason == "cancelled":
            break
    finish = "cancelled" if ends[-1].finish_reason == "cancelled" else ends[0].finish_reason
    completion = sum(end.completion_tokens for end in ends)
    return End(finish, len(tokens), completion, cached, tuple(ends) if sampling.n > 1 else ())


def _tokenize(llama: Llama, prompt: str | list[int], add_bos: bool) -> list[int]:
    if isinstance(prompt, str):
        # special=True: control tokens written in the prompt (a template's <|im_start|>) are tokens, not text.
        return llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    vocabulary = llama.n_vocab()
    if any(not 0 <= token < vocabulary for token in prompt):
        raise InvalidRequest(f"token ids must be between 0 and {vocabulary - 1}")
    return list(prompt)
