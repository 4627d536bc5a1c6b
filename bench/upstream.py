"""The mock upstream: fixed OpenAI-shaped answers from nginx, or from a small aiohttp server when nginx cannot
be had (`python bench/upstream.py --port N` runs that fallback).

The answer is chosen by path, never by body, so nginx can serve it with a bare `return` and stays far from
being the bottleneck:

    /json/v1/chat/completions        a chat.completion object
    /sse/v1/chat/completions         a chat.completion.chunk stream with a usage chunk and [DONE]
    /slow-json/v1/chat/completions   the same object, trickled out over about a second (for disconnects)
    /slow-sse/v1/chat/completions    the same stream, trickled out over about a second
    /{json,sse}/v1/models            a model list

Callers pick the non-stream or stream answer by the base URL they point at (a gateway's provider, or the
load generator for a direct call). Both servers return the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

# Run as a script, bench/ is first on sys.path.
from harness import (
    HOST,
    Child,
    Pinning,
    child_env,
    child_process,
    ensure_tool,
    free_port,
    log,
    run_async,
    tool_version,
    wait_for_port,
    wait_for_tcp,
)

UPSTREAM_MODEL = "gpt-4o-mini"
REPLY_TOKENS = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]
CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench"
# Bytes per second for the slow paths: the answer trickles out over about a second after its first bytes.
SLOW_RATE = 1024
SLOW_AFTER = 256


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 9, "completion_tokens": len(REPLY_TOKENS), "total_tokens": 9 + len(REPLY_TOKENS)}


def chat_json() -> bytes:
    return orjson.dumps(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(REPLY_TOKENS)},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
        }
    )


def chat_sse() -> bytes:
    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
        return {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    chunks: list[dict[str, object]] = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": token}) for token in REPLY_TOKENS]
    chunks.append(chunk({}, "stop"))
    usage_chunk = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": UPSTREAM_MODEL,
        "choices": [],
        "usage": _usage(),
    }
    chunks.append(usage_chunk)
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def models_json() -> bytes:
    model = {"id": UPSTREAM_MODEL, "object": "model", "created": CREATED, "owned_by": "bench"}
    return orjson.dumps({"object": "list", "data": [model]})


@dataclass(frozen=True)
class Upstream:
    """A running mock: `url(kind)` is the OpenAI base URL (ending in /v1) of one of its answers."""

    kind: str  # "nginx" or "python"
    port: int
    child: Child
    note: str
    version: str | None

    def url(self, answer: str) -> str:
        return f"http://{HOST}:{self.port}/{answer}/v1"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "version": self.version, "note": self.note}


# -- nginx ---------------------------------------------------------------------------------------------------


def _nginx_string(body: bytes) -> str:
    """A body as an nginx quoted string: backslash escapes for quotes, backslashes and newlines."""
    text = body.decode()
    if "$" in text:
        raise ValueError("nginx would expand '$' in a return body")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_config(workdir: Path, port: int) -> str:
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    json_body, sse_body, models = _nginx_string(chat_json()), _nginx_string(chat_sse()), _nginx_string(models_json())
    slow = f"limit_rate_after {SLOW_AFTER}; limit_rate {SLOW_RATE};"
    locations = []
    for prefix, body, content_type, extra in (
        ("json", json_body, "application/json", ""),
        ("sse", sse_body, "text/event-stream", ""),
        ("slow-json", json_body, "application/json", slow),
        ("slow-sse", sse_body, "text/event-stream", slow),
    ):
        locations.append(
            f"location = /{prefix}/v1/chat/completions {{ default_type {content_type}; {extra} return 200 {body}; }}\n"
            f"    location = /{prefix}/v1/models {{ default_type application/json; return 200 {models}; }}"
        )
    location_text = "\n    ".join(locations)
    # One process (no master), so it is one pid to pin and to measure; no logs on the hot path.
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    client_body_buffer_size 64k;
    server {{
        listen {HOST}:{port} backlog=4096;
    {location_text}
    location / {{ return 404; }}
    }}
}}
"""


def _start_nginx(stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, nginx: str) -> Upstream:
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(nginx_config(workdir, port))
    argv = pinning.load([nginx, "-p", str(workdir), "-c", str(config)])
    child = stack.enter_context(child_process("nginx mock upstream", argv, workdir / "nginx.log", child_env()))
    wait_for_tcp(child, port, 10.0)
    return Upstream("nginx", port, child, "nginx returning fixed bodies", tool_version([nginx, "-v"]))


def _start_python(stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, why: str) -> Upstream:
    argv = pinning.load([sys.executable, str(Path(__file__).resolve()), "--host", HOST, "--port", "0"])
    child = stack.enter_context(child_process("python mock upstream", argv, workdir / "upstream.log", child_env()))
    port = wait_for_port(child, 20.0)
    note = f"FALLBACK: the Python (aiohttp) mock serves the fixed bodies because {why}; it costs more CPU than nginx"
    log(note)
    return Upstream("python", port, child, note, None)


def start_upstream(stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, prefer_nginx: bool = True) -> Upstream:
    """nginx when it is installed or installable (apt-get, as root), else the Python fallback."""
    if not prefer_nginx:
        return _start_python(stack, workdir, pinning, "--python-mock was given")
    nginx = ensure_tool("nginx", "nginx")
    if nginx is None:
        return _start_python(stack, workdir, pinning, "nginx is not installed and could not be installed")
    try:
        return _start_nginx(stack, workdir, pinning, nginx)
    except Exception as exc:
        return _start_python(stack, workdir, pinning, f"nginx did not start ({exc})")


# -- the Python fallback -------------------------------------------------------------------------------------


async def serve(host: str, port: int) -> None:
    from aiohttp import web

    bodies = {"json": (chat_json(), "application/json"), "sse": (chat_sse(), "text/event-stream")}
    models = models_json()

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        prefix = request.match_info["prefix"]
        body, content_type = bodies[prefix.removeprefix("slow-")]
        if not prefix.startswith("slow-"):
            return web.Response(body=body, content_type=content_type)
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(body[:SLOW_AFTER])
        for start in range(SLOW_AFTER, len(body), SLOW_RATE // 8):
            await asyncio.sleep(1 / 8)
            await response.write(body[start : start + SLOW_RATE // 8])
        await response.write_eof()
        return response

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{prefix:(slow-)?(json|sse)}/v1/chat/completions", chat)
    app.router.add_get("/{prefix:(slow-)?(json|sse)}/v1/models", list_models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    print(f"mock upstream listening on http://{host}:{bound}", flush=True)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The Python fallback of the benchmark's mock upstream.")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    run_async(serve(args.host, args.port))


if __name__ == "__main__":
    main()
