"""What /v1/responses translation adds to a request, in the plane's own CPU: the plane's steps for one request
through /v1/responses (translated to chat completions and back) against the same steps for the same question
through /v1/chat/completions, in process, on the answers the gateway benchmark's mock upstream serves
(bench/upstream.py: a 9-token chat completion, whole and as a stream).

    python bench/responses.py [--rounds N] [--requests N]

Per request, whole answer:
    chat       validate the body; parse the answer; meter it (server.usage.metering.Delivery)
    responses  validate the body (schema, stateless rules); make its chat form (server.responses.dialect);
               parse the chat answer, build the Response, serialise it; parse it again and meter it through its
               chat view (what server.relay does with every answer)
Per request, stream:
    chat       validate; per chunk: parse, meter, frame
    responses  validate, chat form; per chunk: parse, translate to events, serialise them; per event: parse,
               meter through its chat view, frame (`event:` line), note it for `response.failed` and the cache

What is not here is the same for both (routing, limits, the upstream call, usage rows): the gateway benchmark's
`hatchway-responses` contender measures the whole request end to end, next to `hatchway` on the same plane.
Figures: the median over rounds of microseconds per request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from upstream import UPSTREAM_MODEL, chat_json, chat_sse

from server import sse
from server.api.validation import validate_chat
from server.responses.answer import from_chat
from server.responses.dialect import ResponsesDialect
from server.responses.request import validate_responses
from server.responses.stream import Translator
from server.usage.metering import Delivery

CHAT_BODY: dict[str, Any] = {
    "model": UPSTREAM_MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
}
RESPONSES_BODY: dict[str, Any] = {"model": UPSTREAM_MODEL, "input": "Say hello.", "max_output_tokens": 16}


def _payloads(stream: bytes) -> list[bytes]:
    splitter = sse.EventSplitter()
    return [p for p in splitter.feed(stream) if p != sse.DONE]


def chat_whole(answer: bytes) -> None:
    validate_chat(CHAT_BODY)
    doc = orjson.loads(answer)
    Delivery().observe_whole(doc)


def responses_whole(answer: bytes) -> None:
    validate_responses(RESPONSES_BODY)
    dialect = ResponsesDialect(RESPONSES_BODY)
    body = orjson.dumps(from_chat(orjson.loads(answer), dialect.body, dialect.response_id))
    doc = orjson.loads(body)
    Delivery().observe_whole(dialect.answer_view(doc))


def chat_stream(payloads: list[bytes]) -> None:
    body = {**CHAT_BODY, "stream": True}
    validate_chat(body)
    delivery = Delivery()
    for payload in payloads:
        delivery.observe(orjson.loads(payload))
        sse.frame(payload)


def responses_stream(payloads: list[bytes]) -> None:
    body = {**RESPONSES_BODY, "stream": True}
    validate_responses(body)
    dialect = ResponsesDialect(body)
    translator = Translator(body, dialect.response_id)
    events = [orjson.dumps(e) for payload in payloads for e in translator.feed(orjson.loads(payload))]
    events += [orjson.dumps(e) for e in translator.close()]
    delivery = Delivery()
    for payload in events:
        event = orjson.loads(payload)
        view = dialect.event_view(event)
        if view is not None:
            delivery.observe(view)
        dialect.frame(payload, event)


def per_request_us(step: Callable[[], None], requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        step()
    return (time.process_time() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args(argv)
    whole, stream = chat_json(), _payloads(chat_sse())
    cases: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "whole answer": (lambda: chat_whole(whole), lambda: responses_whole(whole)),
        "stream": (lambda: chat_stream(stream), lambda: responses_stream(stream)),
    }
    print(f"{'mode':13} {'chat us/req':>12} {'responses us/req':>17} {'added us/req':>13}")
    for mode, (chat, responses) in cases.items():
        chat(), responses()  # warm: imports, schema compilation, caches
        chat_us, responses_us = [], []
        for _ in range(args.rounds):
            chat_us.append(per_request_us(chat, args.requests))
            responses_us.append(per_request_us(responses, args.requests))
        c, r = statistics.median(chat_us), statistics.median(responses_us)
        print(f"{mode:13} {c:>12.1f} {r:>17.1f} {r - c:>+13.1f}")
    python = sys.version.split()[0]
    print(
        f"({len(stream)} chunks a stream; median of {args.rounds} rounds of {args.requests} requests; Python {python})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
