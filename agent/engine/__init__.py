"""The llama.cpp engine: serves the configured GGUF models to jobs, one llama.cpp context per slot.

Usage:

    engine = Engine([ModelConfig(Path("smollm2.gguf"), slots=2)])
    await engine.start()
    async for event in engine.generate(Job("chat/completions", {"model": "smollm2", "messages": [...]})):
        ...  # Text pieces, then one End; or one Result for embeddings
    await engine.close()

A job borrows a free slot (never waits for one) and runs llama.cpp on a worker thread, which hands events to the event
loop. The slot goes back when that thread is done with it, whether the job finished, failed, was cancelled through
`Job.cancel`, or its consumer walked away. Worker threads outlive their jobs, so that llama.cpp's OpenMP team is not
started anew before every first token (see `_Workers`). A job takes the free slot that holds the longest prefix of its
prompt, and evaluates the rest of its prompt in chunks that a cancel stops between (see agent.slots).

Generated text reaches the event loop in batches (`Job.batch_s`, `Job.batch_max`): the first piece at once, then
what accumulated, on a tick of the loop's own: a steady generation wakes the loop once per batch, and the worker thread
never, rather than once per token; on a machine whose cores llama.cpp keeps busy, every wake-up is taken from its
threads (see _Channel).

A job's way through the package:

    Engine.generate         finds the model (engine.py) and has it check the body and turn it into work for a
                            slot (`_Model.prepare`, requests.py): the sampling, the chat template's prompt, tools
                            and response_format; a bad request fails here, before any slot is taken
    -> slot and thread      the job reserves a slot of its model (agent.slots; the model's llama.cpp contexts were
                            opened by loading.py) and is handed to a worker thread (workers.py)
    -> the work             on that thread: a completion or chat (generation.py), or embeddings (embeddings.py)
    -> the channel          generated text goes to the job's `_Channel` (channel.py), which batches it onto the
                            event loop, where `Engine.generate` yields it; the outcome (End, Result or an
                            EngineError) follows, once the slot and the thread are free again

The package, each module importing only those above it:

    errors      the EngineError tree below
    jobs        Job, the endpoints (CHAT, COMPLETIONS, EMBEDDINGS) and the events: Text, End, Result
    channel     `_Channel`: one job's link from its worker thread to the event loop, and the batching
    workers     `_Workers`: the worker threads
    loading     a model's slots opened from its GGUF, its chat template; ModelStatus, ModelInfo, Issue
    generation  the work of a completion or chat job
    embeddings  the work of an embeddings job
    requests    request parsing: a body turned into a job's work (`_Model`)
    engine      `Engine`

Errors (`code` travels to the plane):

    EngineError                      any failure of a job, before or during generation
    ├── ModelNotFound                model_not_found: no such model, or it failed to load
    ├── InvalidRequest               invalid_request: a body parameter is missing, malformed or unsupported
    │   └── UnsupportedEndpoint      unsupported_endpoint: e.g. chat on a model loaded for embeddings
    ├── NoChatTemplate               no_chat_template: chat asked of a model without a chat template
    ├── ContextLengthExceeded        context_length_exceeded: the prompt does not fit a slot's context
    ├── Busy                         busy: every slot of the model is taken
    └── GenerationFailed             generation_failed: llama.cpp itself failed mid-job
"""

from __future__ import annotations

from agent.engine.engine import Engine
from agent.engine.errors import (
    Busy,
    ContextLengthExceeded,
    EngineError,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    NoChatTemplate,
    UnsupportedEndpoint,
)
from agent.engine.jobs import CHAT, COMPLETIONS, EMBEDDINGS, End, Event, Job, Result, Text
from agent.engine.loading import Issue, ModelInfo, ModelStatus, select_chat_template

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "Busy",
    "ContextLengthExceeded",
    "End",
    "Engine",
    "EngineError",
    "Event",
    "GenerationFailed",
    "InvalidRequest",
    "Issue",
    "Job",
    "ModelInfo",
    "ModelNotFound",
    "ModelStatus",
    "NoChatTemplate",
    "Result",
    "Text",
    "UnsupportedEndpoint",
    "select_chat_template",
]
