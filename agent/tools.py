"""Tool calls on nodes: OpenAI's `tools` / `tool_choice` (and the legacy `functions` / `function_call`) over
llama.cpp, with every call's arguments held to its function's parameters by a grammar.

    plan_chat(body, messages, template)   what a chat request becomes: the messages and tools the chat template
                                          renders, and the `Output` its generation is held to
    CallParser                            splits the generated text into content and tool-call deltas, as it comes

How the model is told about tools, and how it answers (`ToolFormat`, from the model's chat template):

    hermes     templates that write `<tool_call>` (Qwen 2.5 / 3, Hermes, SmolLM3, ...) render the tools themselves;
               a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, parallel calls one
               block after another
    llama3     templates that ask for `{"name": function name, "parameters": dictionary ...}` (Llama 3.1 - 3.3):
               one call, the whole answer
    fallback   any other template (the demo model's): it renders no tools. A system block lists the functions as
               JSON schemas within <tools></tools> and asks for the hermes form; assistant tool calls in the
               history are written back in that form, tool results as user turns within
               <tool_response></tool_response>

How the answer is held to it (`Output`):

    required / a named function   the whole answer is grammar-bound to a call (or, for required, up to
                                  MAX_PARALLEL_CALLS of them when parallel_tool_calls allows)
    auto                          free text until the model writes the format's opener (`<tool_call>`, or `{` as
                                  the first character for llama3); the generation then goes on from there bound to
                                  the grammar of the rest of the call (agent.engine restarts it with the opener
                                  as prompt, which the slot's cache makes cheap): llama.cpp's lazy grammars, done
                                  here. With a response_format as well, one grammar allows either a call or the
                                  JSON answer from the first token.
    none                          no tools are rendered and nothing is parsed: plain text

A final assistant message with text (a prefill: the plane continuing a broken stream) continues text: calls are
off for it under auto, and refused under required or a named function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from agent import sampling as sampler
from agent.grammar import Grammar, PrimedGrammar, ResponseFormatError, UnsupportedSchema, response_grammar
from agent.sampling import ChoiceEnd, Sampling, TokenLogprob
from agent.slots import keep_prefix, prefill

# The most calls one answer makes under `required` with parallel calls: a small model would otherwise go on
# calling until max_tokens cut a call in two.
MAX_PARALLEL_CALLS = 8
# OpenAI's rule for function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What may come before a call's arguments once its opener is written; more means the call cannot be parsed.
_MAX_HEAD_CHARS = 512
_ID_ALPHABET = string.ascii_letters + string.digits


class ToolsError(ValueError):
    """A malformed or unsupported tools request (a 400)."""


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a call: `opener`, the call object (`{"name": ..., <arguments_key>: {...}}`, whose "{"
    the opener includes when `brace_opens`), then `closer`."""

    name: str
    opener: str
    closer: str
    arguments_key: str
    parallel: bool
    at_start_only: bool = False
    brace_opens: bool = False
    native: bool = True  # the template renders tools and tool messages itself


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", parallel=True)
LLAMA3 = ToolFormat("llama3", "{", "", "parameters", parallel=False, at_start_only=True, brace_opens=True)
FALLBACK = ToolFormat("fallback", "<tool_call>", "</tool_call>", "arguments", parallel=True, native=False)


@functools.lru_cache(maxsize=64)
def template_format(template: str) -> ToolFormat:
    """The tool format of a chat template: its own when it renders tools in a form known here, else FALLBACK."""
    if not re.search(r"\btools\b", template):
        return FALLBACK
    if "<tool_call>" in template:
        return HERMES
    if '"parameters": dictionary' in template:
        return LLAMA3
    return FALLBACK


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """As a template (or the fallback block) shows it."""
        spec: dict[str, Any] = {"name": self.name}
        if self.description:
            spec["description"] = self.description
        spec["parameters"] = self.parameters
        return spec


@dataclass(frozen=True)
class Calls:
    """Tool calls the answer may hold: how they are written, and the grammar of a call's rest once opened."""

    format: ToolFormat
    after_opener: str  # GBNF: the rest of the answer once the opener is written (auto)
    legacy: bool  # the request used `functions`: answer with `function_call`


@dataclass(frozen=True)
class Output:
    """What a generation is held to: `grammar` from its first token (None: free text), `calls` to parse out of it,
    and `prefill`, text the answer already holds, which the grammar reads before the first token."""

    grammar: str | None = None
    calls: Calls | None = None
    prefill: str = ""
    prefill_tokens: tuple[int, ...] = ()  # the prefill's tokens, checked against the grammar (agent.engine)


@dataclass(frozen=True)
class ChatPlan:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # for the template's `tools` variable
    output: Output


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a call, as OpenAI streams them: the first names the call (`id`, `name`), later ones add to
    its `arguments`."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


def plan_chat(body: Mapping[str, Any], messages: list[dict[str, Any]], template: str) -> ChatPlan:
    """The messages and tools to render, and the output the answer is held to; raises ToolsError (and the
    ValueErrors of agent.grammar) for what the request gets wrong."""
    functions, legacy = _functions(body)
    choice = _choice(body, functions, legacy)
    fmt = template_format(template)
    prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    if prefill and choice not in ("auto", "none"):
        raise ToolsError("a final assistant message cannot be continued when a tool call is required")
    try:
        schema = response_grammar(body)
    except (ResponseFormatError, UnsupportedSchema) as exc:
        raise ToolsError(f"response_format: {exc}") from exc
    offered = functions if choice != "none" else []
    history = _history(messages, fmt)
    if fmt.native:
        rendered, tools = history, [{"type": "function", "function": f.spec()} for f in offered] or None
    else:
        rendered, tools = _with_tool_block(history, offered), None
    if not offered or prefill:
        # A continuation of delivered text stays text (agent.engine feeds the prefill to the schema's grammar).
        return ChatPlan(rendered, tools, Output(grammar=schema, prefill=prefill))
    parallel = fmt.parallel and not legacy and body.get("parallel_tool_calls") is not False
    allowed = offered
    if choice not in ("auto", "required"):
        allowed, parallel = [f for f in offered if f.name == choice], False
    grammar = _call_grammar(allowed, fmt, parallel)
    calls = Calls(fmt, grammar.after_opener, legacy)
    if choice == "auto":
        start = None if schema is None else _either(grammar.whole, schema)
        return ChatPlan(rendered, tools, Output(grammar=start, calls=calls))
    return ChatPlan(rendered, tools, Output(grammar=grammar.whole, calls=calls))


def _functions(body: Mapping[str, Any]) -> tuple[list[Function], bool]:
    tools, legacy = body.get("tools"), body.get("functions")
    if tools is not None and legacy is not None:
        raise ToolsError("'tools' and 'functions' cannot be used together")
    raw = tools if tools is not None else legacy
    if raw is None:
        return [], False
    if not isinstance(raw, list):
        raise ToolsError("'tools' must be a list" if tools is not None else "'functions' must be a list")
    functions: list[Function] = []
    for index, entry in enumerate(raw):
        where = f"tools[{index}]" if tools is not None else f"functions[{index}]"
        if tools is not None:
            if not isinstance(entry, dict) or entry.get("type") != "function":
                raise ToolsError(f"{where}: only tools of type 'function' are supported")
            entry = entry.get("function")
        functions.append(_function(entry, where))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ToolsError("function names must be unique")
    return functions, legacy is not None


def _function(entry: Any, where: str) -> Function:
    if not isinstance(entry, dict):
        raise ToolsError(f"{where}: a function must be an object")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolsError(f"{where}: a function name is 1 to 64 letters, digits, '_' or '-'")
    description = entry.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolsError(f"{where}: 'description' must be a string")
    parameters = entry.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolsError(f"{where}: 'parameters' must be a JSON schema of an object")
    return Function(name, description, parameters)


def _choice(body: Mapping[str, Any], functions: list[Function], legacy: bool) -> str:
    """auto, none, required, or the name of the function that must be called."""
    names = {f.name for f in functions}
    key = "function_call" if legacy else "tool_choice"
    raw = body.get(key)
    if raw is None:
        return "auto" if functions else "none"
    if raw in ("auto", "none") or (raw == "required" and not legacy):
        if raw != "none" and not functions:
            raise ToolsError(f"'{key}' {raw!r} needs functions to call")
        return str(raw)
    if isinstance(raw, dict):
        function = raw if legacy else raw.get("function")
        if (legacy or raw.get("type") == "function") and isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name in names:
                return name
            raise ToolsError(f"'{key}' names a function that is not offered: {str(name)[:64]!r}")
    raise ToolsError(f"'{key}' must be auto, none{'' if legacy else ', required'} or name a function")


# --- the prompt: the history and the offered functions --------------------------------------------------------


def _history(messages: list[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """The messages with their tool calls and results in the form the template (or the fallback) reads."""
    if not any(m.get("tool_calls") or m.get("function_call") or m["role"] == "tool" for m in messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    names: dict[str, str] = {}  # call id -> function name, for tool results that name only the call
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "assistant":
            calls = _calls(message, index)
            names.update((call["id"], call["function"]["name"]) for call in calls)
            if not calls:
                out.append({"role": role, "content": message["content"]})
            elif fmt.native:
                out.append({"role": role, "content": message["content"], "tool_calls": calls})
            else:
                blocks = "\n".join(_fallback_call(call) for call in calls)
                content = message["content"]
                out.append({"role": role, "content": f"{content}\n{blocks}" if content else blocks})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("name") or names.get(call_id if isinstance(call_id, str) else "", "")
            if fmt.native:
                result = {"role": "tool", "content": message["content"], "name": name}
                if isinstance(call_id, str):
                    result["tool_call_id"] = call_id
                out.append(result)
            else:
                response = json.dumps({"name": name, "content": message["content"]}, ensure_ascii=False)
                block = f"<tool_response>\n{response}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1]["content"] += "\n" + block  # results of parallel calls: one user turn
                else:
                    out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append({"role": role, "content": message["content"]})
    for message in out:
        message.pop("tool_results", None)
    return out


def _calls(message: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    """An assistant message's calls, OpenAI's shape with the arguments as an object (what templates expect)."""
    raw = message.get("tool_calls")
    if raw is None and isinstance(message.get("function_call"), dict):
        raw = [{"id": f"call_{index}", "type": "function", "function": message["function_call"]}]
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ToolsError(f"messages[{index}].tool_calls must be a list")
    calls: list[dict[str, Any]] = []
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolsError(f"messages[{index}].tool_calls: each call needs a function with a name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):  # else shown as the string it is
                arguments = json.loads(arguments or "{}")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{index}_{len(calls)}"
        function = {"name": function["name"], "arguments": arguments}
        calls.append({"id": call_id, "type": "function", "function": function})
    return calls


def _fallback_call(call: Mapping[str, Any]) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


FALLBACK_PROMPT = """You can call functions. They are listed within <tools></tools> as JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object of its name and arguments within <tool_call></tool_call>:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>
Function results come back within <tool_response></tool_response>."""


def _with_tool_block(messages: list[dict[str, Any]], functions: Sequence[Function]) -> list[dict[str, Any]]:
    """The fallback: the functions listed in the system message (a new one first when there is none)."""
    if not functions:
        return messages
    listing = "\n".join(json.dumps(f.spec(), ensure_ascii=False) for f in functions)
    block = FALLBACK_PROMPT.format(tools=listing)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{first['content']}\n\n{block}" if first["content"] else block
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


# --- grammars ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CallGrammar:
    whole: str  # the answer from its first character: one call or more
    after_opener: str  # the answer once the first opener is written


def _call_grammar(functions: Sequence[Function], fmt: ToolFormat, parallel: bool) -> _CallGrammar:
    key = json.dumps([[f.name, f.parameters] for f in functions], separators=(",", ":"), ensure_ascii=False)
    whole, after = _cached_call_grammar(key, fmt, parallel)
    return _CallGrammar(whole, after)


@functools.lru_cache(maxsize=256)
def _cached_call_grammar(key: str, fmt: ToolFormat, parallel: bool) -> tuple[str, str]:
    functions = json.loads(key)
    grammars = []
    for opened in (False, True):
        grammar = Grammar()
        alternatives = []
        for index, (name, parameters) in enumerate(functions):
            try:
                arguments = grammar.schema(parameters, f"fn{index}-args")
            except UnsupportedSchema as exc:
                raise ToolsError(f"function {name}: parameters: {exc}") from exc
            head = f'{grammar.literal(json.dumps("name"))} space ":" space {grammar.literal(json.dumps(name))} space'
            pair = f'{grammar.literal(json.dumps(fmt.arguments_key))} space ":" space {arguments}'
            grammar.rule(f"fn{index}-call", f'space {head} "," space {pair} "}}" space')
            alternatives.append(f"fn{index}-call")
        grammar.rule("call-rest", " | ".join(alternatives))  # a call after its "{"
        opener = grammar.literal(fmt.opener)
        if fmt.brace_opens:
            # The opener is the call's own "{": the answer is one call.
            grammar.rule("root", "call-rest" if opened else f"{opener} call-rest")
        else:
            closer = grammar.literal(fmt.closer)
            grammar.rule("block-rest", f'"\\n"? "{{" call-rest "\\n"? {closer}')  # a block after its opener
            more = f' ("\\n" {opener} block-rest){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
            grammar.rule("root", f"block-rest{more}" if opened else f"{opener} block-rest{more}")
        grammars.append(grammar.gbnf())
    return grammars[0], grammars[1]


def _either(calls: str, answer: str) -> str:
    """One grammar allowing either the calls or the answer: each grammar's rules, renamed apart."""
    return "\n".join(
        [
            "root ::= calls-root | answer-root",
            _prefixed(calls, "calls-"),
            _prefixed(answer, "answer-"),
        ]
    )


def _prefixed(gbnf: str, prefix: str) -> str:
    names = {line.split(" ::= ", 1)[0] for line in gbnf.splitlines() if " ::= " in line}
    pattern = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z0-9-]+')

    def rename(line: str) -> str:
        return pattern.sub(lambda m: prefix + m.group(0) if m.group(0) in names else m.group(0), line)

    return "\n".join(rename(line) for line in gbnf.splitlines())


# --- reading the answer -------------------------------------------------------------------------------------------


def call_id() -> str:
    """An id for a call, in OpenAI's form."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


Piece = str | ToolCallDelta


@dataclass
class CallParser:
    """Reads a generated answer as it comes: content until an opener, then calls, as ToolCallDeltas.

    `feed` takes text and returns what is ready of it (content strings, deltas): a call's first delta once its
    name is complete, then its arguments as they are written. `opened` turns true with the first opener;
    `take_overshoot` then returns (and forgets) what was fed after it, for a generation restarted from there.
    """

    format: ToolFormat
    calls: int = 0
    opened: bool = False
    _state: Literal["text", "head", "arguments", "between"] = "text"
    _buffer: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _started: bool = False  # any non-blank text was read (llama3: the opener must come first)
    _head: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        brace = "" if self.format.brace_opens else r"\s*\{"
        key = re.escape(json.dumps(self.format.arguments_key))
        self._head = re.compile(brace + r'\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*' + key + r"\s*:\s*")

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        out: list[Piece] = []
        while self._buffer:
            before = (self._state, len(self._buffer))
            if self._state == "text":
                self._text(out)
            elif self._state == "head":
                self._read_head(out)
            elif self._state == "arguments":
                self._arguments(out)
            else:
                self._between()
            if (self._state, len(self._buffer)) == before:
                break  # waiting for more text
        return out

    def take_overshoot(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest

    def finish(self) -> list[Piece]:
        """The answer ended: content held back in case it began an opener."""
        if self._state == "text" and self._buffer:
            rest, self._buffer = self._buffer, ""
            return [rest]
        return []

    def _text(self, out: list[Piece]) -> None:
        opener, buffer = self.format.opener, self._buffer
        if self.format.at_start_only:
            stripped = buffer.lstrip()
            if not stripped or (self._started is False and stripped.startswith(opener)):
                if stripped:
                    self._open(out, "", stripped[len(opener) :])
                return
            self._started = True
            out.append(buffer)
            self._buffer = ""
            return
        found = buffer.find(opener)
        if found >= 0:
            self._open(out, buffer[:found], buffer[found + len(opener) :])
            return
        keep = _partial_suffix(buffer, opener)
        if len(buffer) > keep:
            out.append(buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep :]

    def _open(self, out: list[Piece], before: str, after: str) -> None:
        if before:
            out.append(before)
        self.opened = True
        self._state, self._buffer = "head", after

    def _read_head(self, out: list[Piece]) -> None:
        match = self._head.match(self._buffer)
        if match is None:
            if len(self._buffer) > _MAX_HEAD_CHARS:
                self._state, self._buffer = "between", ""  # not a call after all: nothing to parse
            return
        name = json.loads(f'"{match.group(1)}"')
        out.append(ToolCallDelta(self.calls, call_id(), name, ""))
        self._buffer = self._buffer[match.end() :]
        self._state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False

    def _arguments(self, out: list[Piece]) -> None:
        """The arguments object, passed on as written until its closing brace."""
        buffer = self._buffer if self._depth else self._buffer.lstrip()  # no blank before the object
        end = None
        for position, char in enumerate(buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = position + 1
                    break
        written = buffer if end is None else buffer[:end]
        if written:
            out.append(ToolCallDelta(self.calls, arguments=written))
        self._buffer = "" if end is None else buffer[end:]
        if end is not None:
            self.calls += 1
            self._state = "between"

    def _between(self) -> None:
        """After a call: its closing brace and closer, and then perhaps the next call's opener."""
        if self.format.at_start_only:
            self._buffer = ""  # one call is the whole answer
            return
        found = self._buffer.find(self.format.opener)
        if found >= 0:
            self._state, self._buffer = "head", self._buffer[found + len(self.format.opener) :]
            return
        keep = _partial_suffix(self._buffer, self.format.opener)
        self._buffer = self._buffer[len(self._buffer) - keep :] if keep else ""


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def merge(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive argument fragments of one call as one: a batch of pieces sends each call's news once. A call's
    first fragment stays apart, with empty arguments, as OpenAI streams a call."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if last is not None and last.index == delta.index and not delta.id and not last.id:
            merged[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + delta.arguments)
        else:
            merged.append(delta)
    return merged


# --- generating a choice held to an Output --------------------------------------------------------------------

# The engine's channel: (text, its tokens' logprobs, choice index, tool-call deltas).
Emit = Callable[[str, tuple[TokenLogprob, ...], int, tuple[ToolCallDelta, ...]], None]


def run_choice(
    llama: Llama,
    prompt: Sequence[int],
    sampling: Sampling,
    index: int,
    emit: Emit,
    should_stop: Callable[[], bool],
    output: Output | None,
) -> ChoiceEnd:
    """agent.sampling's `run_choice`, held to `output`: its grammar from the first token, its calls read out of the
    text; under auto, restarted from the opener with the call's grammar once the model opens a call."""
    if output is None or (output.grammar is None and output.calls is None):
        return sampler.run_choice(llama, prompt, sampling, index, _text_only(emit), should_stop)
    grammar = PrimedGrammar(output.grammar, output.prefill_tokens) if output.grammar is not None else None
    calls = output.calls
    if calls is None:
        return sampler.run_choice(llama, prompt, sampling, index, _text_only(emit), should_stop, grammar)
    parser = CallParser(calls.format)
    written: list[str] = []  # what the parser read of this run: the call's opener ends it under auto

    def read(text: str, logprobs: tuple[TokenLogprob, ...], choice: int) -> None:
        written.append(text)
        _emit_pieces(emit, parser.feed(text), logprobs, choice)

    lazy = grammar is None  # auto: free text until an opener
    end = sampler.run_choice(
        llama, prompt, sampling, index, read, lambda: should_stop() or (lazy and parser.opened), grammar
    )
    if lazy and parser.opened and not should_stop():
        end = _continue_call(llama, prompt, sampling, index, read, should_stop, parser, written, calls)
    _emit_pieces(emit, parser.finish(), (), index)
    finish = end.finish_reason
    if parser.calls and finish == "stop":
        finish = "function_call" if calls.legacy else "tool_calls"
    return ChoiceEnd(index, finish, end.completion_tokens)


def _continue_call(
    llama: Llama,
    prompt: Sequence[int],
    sampling: Sampling,
    index: int,
    read: sampler.Emit,
    should_stop: Callable[[], bool],
    parser: CallParser,
    written: list[str],
    calls: Calls,
) -> ChoiceEnd:
    """The model wrote a call's opener in free text: go on from there under the grammar of the call's rest. The
    text sampled after the opener (in the opener's last token) is dropped; the prompt is the original one plus
    the text up to the opener, which the slot holds already but for the tokens around its end."""
    overshoot = parser.take_overshoot()
    text = "".join(written)
    text = text[: len(text) - len(overshoot)] if overshoot else text
    opened = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    resumed = [*prompt, *opened]
    budget = None if sampling.max_tokens is None else sampling.max_tokens - len(opened)
    if (budget is not None and budget <= 0) or len(resumed) >= llama.n_ctx():
        return ChoiceEnd(index, "length", len(opened))
    keep_prefix(llama, resumed)
    if not prefill(llama, resumed, should_stop):
        return ChoiceEnd(index, "cancelled", len(opened))
    rest = sampler.run_choice(
        llama,
        resumed,
        dataclasses.replace(sampling, max_tokens=budget),
        index,
        read,
        should_stop,
        LlamaGrammar.from_string(calls.after_opener, verbose=False),
    )
    return ChoiceEnd(index, rest.finish_reason, len(opened) + rest.completion_tokens)


def _text_only(emit: Emit) -> sampler.Emit:
    return lambda text, logprobs, choice: emit(text, logprobs, choice, ())


def _emit_pieces(emit: Emit, pieces: list[Piece], logprobs: tuple[TokenLogprob, ...], choice: int) -> None:
    """Content as text, calls as deltas; the piece's logprobs go with its content (a call's tokens carry none)."""
    for piece in pieces:
        if isinstance(piece, str):
            emit(piece, logprobs, choice, ())
            logprobs = ()
        else:
            emit("", (), choice, (piece,))
