"""Turning a request body into work for a slot (`_Model.prepare`), checked before any slot is taken."""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent import sampling as sampler
from agent import tools
from agent.engine.channel import _Channel
from agent.engine.embeddings import _embed
from agent.engine.errors import InvalidRequest, NoChatTemplate, UnsupportedEndpoint
from agent.engine.generation import _complete
from agent.engine.jobs import CHAT, COMPLETIONS, EMBEDDINGS, Event
from agent.engine.loading import ModelInfo
from agent.gpufit import GpuFit
from agent.grammar import PrefillRejected, check_prefix
from agent.models import ModelConfig
from agent.sampling import Sampling
from agent.slots import Lease, Slots

_Work = Callable[[Lease, _Channel], Event]


@dataclass
class _Model:
    config: ModelConfig
    slots: Slots
    formatter: Jinja2ChatFormatter | None
    size_bytes: int
    gpu: GpuFit | None = None

    def info(self) -> ModelInfo:
        config = self.config
        return ModelInfo(
            name=config.name,
            slots=config.slots,
            context=config.context,
            price_in=config.price_in,
            price_out=config.price_out,
            has_chat_template=self.formatter is not None,
            embeddings=config.embeddings,
            path=config.path,
            size_bytes=self.size_bytes,
            gpu=self.gpu,
        )

    def prepare(self, endpoint: str, body: Mapping[str, Any]) -> _Work:
        """Check the body and turn it into the work a slot runs; raises before any slot is taken."""
        name = self.config.name
        if endpoint == EMBEDDINGS:
            if not self.config.embeddings:
                raise UnsupportedEndpoint(f"model {name} is not loaded for embeddings")
            return functools.partial(_embed, inputs=_embedding_inputs(body), model=name, encoding=_encoding(body))
        if endpoint not in (CHAT, COMPLETIONS):
            raise UnsupportedEndpoint(f"unknown endpoint {endpoint!r}")
        if self.config.embeddings:
            raise UnsupportedEndpoint(f"model {name} is loaded for embeddings only")
        _reject_unsupported(endpoint, body)
        sampling = _sampling(endpoint, body)
        if endpoint == COMPLETIONS:
            return functools.partial(_complete, prompt=_completion_prompt(body), add_bos=True, sampling=sampling)
        if self.formatter is None:
            raise NoChatTemplate(f"model {name} has no chat template; use /v1/completions or configure one")
        plan = self._plan(body)
        prompt, template_stops = _render_chat(self.formatter, plan.messages, plan.tools)
        sampling = dataclasses.replace(sampling, stop=(*sampling.stop, *template_stops))
        # The template writes BOS itself where the model wants one, as llama-cpp-python's own chat handler assumes.
        return functools.partial(_complete, prompt=prompt, add_bos=False, sampling=sampling, output=plan.output)

    def _plan(self, body: Mapping[str, Any]) -> tools.ChatPlan:
        """Tools and response_format (agent.tools, agent.grammar): what the template renders, what the answer is
        held to. A prefilled answer under a grammar is checked here, before a slot is taken."""
        assert self.formatter is not None
        try:
            plan = tools.plan_chat(body, _messages(body), self.formatter.template)
            output = plan.output
            if output.prefill and output.grammar is not None:
                prefix = check_prefix(self.slots.tokenizer, output.grammar, output.prefill)
                plan = dataclasses.replace(plan, output=dataclasses.replace(output, prefill_tokens=prefix))
        except PrefillRejected as exc:
            raise InvalidRequest(f"the final assistant message does not fit the response_format: {exc}") from exc
        except ValueError as exc:  # ToolsError, UnsupportedSchema, ResponseFormatError
            raise InvalidRequest(str(exc)) from exc
        return plan


def _sampling(endpoint: str, body: Mapping[str, Any]) -> Sampling:
    try:
        return sampler.parse(endpoint, body, lambda: secrets.randbits(32))
    except sampler.InvalidParameter as exc:
        raise InvalidRequest(str(exc)) from exc


def _reject_unsupported(endpoint: str, body: Mapping[str, Any]) -> None:
    """Refuse what llama.cpp nodes cannot honour rather than answer something the client did not ask for (the
    sampling parameters: agent.sampling; tools and response_format on chat: agent.tools)."""
    if endpoint == COMPLETIONS and any(body.get(key) for key in ("tools", "functions", "response_format")):
        raise InvalidRequest("'tools', 'functions' and 'response_format' are chat parameters")


def _completion_prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(token, int) and not isinstance(token, bool) for token in prompt):
        return cast(list[int], prompt)
    raise InvalidRequest("'prompt' must be a string, a list of one string, or a list of token ids")


_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # the legacy functions' results
}
# What agent.tools reads of a message besides its role and content.
_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id", "name")


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{index}].role must be one of {', '.join(_ROLES)}")
        # Templates only know the classic roles; "developer" is OpenAI's new name for "system".
        entry = {"role": _ROLES[role], "content": _content(message.get("content"), index)}
        entry.update((key, message[key]) for key in _TOOL_KEYS if message.get(key) is not None)
        messages.append(entry)
    return messages


def _content(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(text, str) for text in texts):
            return "".join(cast(list[str], texts))
    raise InvalidRequest(f"messages[{index}].content must be a string or a list of text parts")


def _render_chat(
    formatter: Jinja2ChatFormatter, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, tuple[str, ...]]:
    """The prompt for `messages` (and `tools`, for a template that renders them), and the template's stop strings.

    A final assistant message is a prefill: the messages before it are rendered with the generation prompt and its
    content is appended verbatim, so the model continues that text instead of starting a new turn.
    """
    prefill = ""
    if messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        messages = messages[:-1]
    try:
        rendered = formatter(messages=cast(Any, messages), tools=cast(Any, tools))
    except (ValueError, jinja2.TemplateError) as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc
    stop = rendered.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return rendered.prompt + prefill, stops


def _embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) and item for item in inputs):
        raise InvalidRequest("'input' must be a non-empty string or a list of non-empty strings")
    if body.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported")
    return cast(list[str], inputs)


def _encoding(body: Mapping[str, Any]) -> str:
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'")
    return str(encoding)
