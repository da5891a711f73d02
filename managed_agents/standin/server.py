"""The stand-in Messages API server (`POST /v1/messages`, JSON or SSE), over aiohttp.

It answers what the real endpoint would for the shapes the brain uses: content blocks, tool_use, stop reasons,
usage (estimated at 4 characters a token), errors in the API's error format (429 with `retry-after`, 500,
529),
and, when asked to, garbled responses. It keeps no conversation state: the script step is the number of
assistant messages in the request. Only failure injection counts requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from managed_agents.standin.script import Script, Step

_ERRORS = {
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _fill(value: Any, placeholder: str, replacement: str) -> Any:
    """`value` with `placeholder` replaced in every string inside it."""
    if isinstance(value, str):
        return value.replace(placeholder, replacement)
    if isinstance(value, list):
        return [_fill(v, placeholder, replacement) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, placeholder, replacement) for k, v in value.items()}
    return value


def _texts(blocks: Any) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    found = []
    for block in blocks or ():
        if block.get("type") == "text":
            found.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            found.extend(_texts(block.get("content")))
    return found


@dataclass
class Standin:
    """The server's state: its script, the requests it saw (for tests) and failures already injected."""

    script: Script
    requests: list[dict[str, Any]] = field(default_factory=list)
    # `time.monotonic()` when each request arrived, for latency measurements.
    arrivals: list[float] = field(default_factory=list)
    _failures: Counter[tuple[str, int]] = field(default_factory=Counter)

    def app(self) -> web.Application:
        """The aiohttp application."""
        application = web.Application(client_max_size=64 * 1024 * 1024)
        application.router.add_post("/v1/messages", self._messages)
        application.router.add_get("/healthz", self._health)
        return application

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "script": self.script.name})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if not (request.headers.get("x-api-key") or request.headers.get("authorization")):
            return self._error(401, "authentication_error", "x-api-key header is required")
        try:
            body = await request.json()
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            return self._error(400, "invalid_request_error", "body must be JSON with messages")
        self.requests.append(body)
        self.arrivals.append(time.monotonic())
        first_user: dict[str, Any] = next((m for m in messages if m.get("role") == "user"), {})
        first_text = " ".join(_texts(first_user.get("content")))
        steps = self.script.steps_for(first_text)
        index = sum(1 for m in messages if m.get("role") == "assistant")
        step = steps[index] if index < len(steps) else None
        latency = step.latency_s if step and step.latency_s is not None else self.script.latency_s
        if latency:
            await asyncio.sleep(latency)
        if step is not None:
            key = (first_text, index)
            if self._failures[key] < len(step.fail):
                status = step.fail[self._failures[key]]
                self._failures[key] += 1
                if status == 0:
                    return web.Response(
                        status=200, text="<html>not what you expected</html>", content_type="application/json"
                    )
                kind, message = _ERRORS.get(status, ("api_error", "error"))
                return self._error(status, kind, message)
            if step.garbage:
                return web.Response(
                    status=200, text='{"type": "message", "content": 42', content_type="application/json"
                )
        answer = self._message(body, step, messages)
        if body.get("stream"):
            return await self._stream(request, answer)
        return web.json_response(answer)

    def _error(self, status: int, kind: str, text: str) -> web.Response:
        headers = {"retry-after": "1"} if status == 429 else {}
        return web.json_response(
            {"type": "error", "error": {"type": kind, "message": text}}, status=status, headers=headers
        )

    def _message(self, body: dict[str, Any], step: Step | None, messages: list[dict[str, Any]]) -> dict[str, Any]:
        last_result = ""
        last_user = ""
        for message in messages:
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, list) and any(b.get("type") == "tool_result" for b in content):
                last_result = "\n".join(_texts([b for b in content if b.get("type") == "tool_result"]))
            else:
                last_user = " ".join(_texts(content))
        tail = "\n".join(last_result.strip().splitlines()[-6:])
        blocks: list[dict[str, Any]] = []
        for block in step.content if step else ({"type": "text", "text": self.script.final_text},):
            if block["type"] == "text":
                value = block["text"].replace("{last_tool_result}", tail).replace("{last_user_message}", last_user)
                blocks.append({"type": "text", "text": value})
            elif block["type"] == "tool_use":
                tool_use_id = f"toolu_{uuid.uuid4().hex[:24]}"
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": tool_use_id,
                        "name": block["name"],
                        "input": _fill(block["input"], "{tool_use_id}", tool_use_id),
                    }
                )
            else:
                blocks.append(dict(block))
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        prompt_chars = len(json.dumps(body.get("messages", ()))) + len(json.dumps(body.get("system", "")))
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-standin"),
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": max(1, prompt_chars // 4),
                "output_tokens": max(1, len(json.dumps(blocks)) // 4),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    async def _stream(self, request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())

        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**message["usage"], "output_tokens": 1},
        }
        await send("message_start", {"message": start})
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                await send("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                value = block["text"]
                for cut in range(0, len(value), 40):
                    await send(
                        "content_block_delta",
                        {"index": index, "delta": {"type": "text_delta", "text": value[cut : cut + 40]}},
                    )
            elif block["type"] == "tool_use":
                await send("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                raw = json.dumps(block["input"])
                for cut in range(0, len(raw), 64):
                    await send(
                        "content_block_delta",
                        {
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": raw[cut : cut + 64]},
                        },
                    )
            await send("content_block_stop", {"index": index})
        await send("ping", {})
        await send(
            "message_delta",
            {
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
        )
        await send("message_stop", {})
        await response.write_eof()
        return response


class StandinServer:
    """A running stand-in on loopback; `base_url` is what `ANTHROPIC_BASE_URL` should be."""

    def __init__(self, standin: Standin, runner: web.AppRunner, port: int) -> None:
        self.standin = standin
        self._runner = runner
        self.port = port

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`."""
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, script: Script, *, host: str = "127.0.0.1", port: int = 0) -> StandinServer:
        """Serves `script` on host:port (0 picks a free port)."""
        standin = Standin(script)
        # Cancel a handler whose client went away (a brain interrupting a slow answer), and do not wait long
        # for slow answers on shutdown.
        runner = web.AppRunner(standin.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        # aiohttp exposes the port bound for port 0 only through the site's server sockets.
        server: Any = site._server
        assert server is not None and server.sockets
        bound = server.sockets[0].getsockname()[1]
        return cls(standin, runner, int(bound))

    async def aclose(self) -> None:
        """Stops serving."""
        await self._runner.cleanup()
