"""The work of an embeddings job, run on the job's worker thread: one unit-length vector per input."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.engine.channel import _Channel
from agent.engine.errors import ContextLengthExceeded
from agent.engine.jobs import End, Event, Result
from agent.slots import Lease


def _embed(lease: Lease, channel: _Channel, *, inputs: list[str], model: str, encoding: str) -> Event:
    llama = lease.take(())  # embedding keeps no cache worth choosing a slot for
    limit = min(llama.n_ctx(), llama.n_batch)
    data: list[dict[str, Any]] = []
    total = 0
    for index, text in enumerate(inputs):
        if channel.should_stop():
            return End("cancelled", total, 0)
        count = len(llama.tokenize(text.encode("utf-8")))  # the tokens `embed` decodes
        if count > limit:
            raise ContextLengthExceeded(f"input[{index}] is {count} tokens but the model embeds at most {limit}")
        vector = np.asarray(llama.embed(text, truncate=False), dtype=np.float32)
        if vector.ndim == 2:
            vector = vector.mean(axis=0)  # the model pools nothing itself
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm  # unit length, as OpenAI's embeddings are
        total += count
        data.append({"object": "embedding", "index": index, "embedding": _encode_vector(vector, encoding)})
    usage = {"prompt_tokens": total, "total_tokens": total}
    return Result({"object": "list", "data": data, "model": model, "usage": usage})


def _encode_vector(vector: npt.NDArray[np.float32], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(value) for value in vector]
