"""Async streaming client for any OpenAI-compatible server, and the drivers that run many at once.

Each request streams (`stream=true`, `stream_options.include_usage=true`) and is timed per
content chunk. Anything that goes wrong with one request (HTTP error, broken or malformed
stream, timeout) is stored on its record; it never ends the run.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from pd.bench.workload import BenchRequest, Session, to_prompt

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_LINE_END = re.compile(r"\r\n|\r|\n")


class RequestFailed(Exception):
    """The server answered, but not with a usable stream."""


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")
        object.__setattr__(self, "base_url", server_root(self.base_url))

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def server_root(base_url: str) -> str:
    """The server root, accepting a trailing slash or /v1 (the client appends /v1/...)."""
    root = base_url.rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {base_url!r}")
    return root[:-3] if root.endswith("/v1") else root


@dataclass
class RequestRecord:
    """What one request did; times are time.perf_counter() seconds."""
    index: int
    session_id: str | None = None
    turn: int | None = None
    is_warmup: bool = False
    expected_prompt_tokens: int = 0
    send_time: float = 0.0
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with output text
    text_parts: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None  # from the usage chunk
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    is_done: bool = False  # saw data: [DONE]
    error: str | None = None

    @property
    def is_success(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end_time - self.send_time

    @property
    def num_output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.expected_prompt_tokens

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


# ---- server-sent events --------------------------------------------------------------------------
async def iter_sse_data(byte_chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """Yield the data of each server-sent event; chunks may split lines and UTF-8 anywhere."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    data_lines: list[str] = []
    async for chunk in byte_chunks:
        buffer += decoder.decode(chunk)
        lines, buffer = _take_lines(buffer)
        for line in lines:
            event = _feed_line(line, data_lines)
            if event is not None:
                yield event
    for line in _LINE_END.split(buffer + decoder.decode(b"", final=True)):
        event = _feed_line(line, data_lines)
        if event is not None:
            yield event
    if data_lines:  # the stream ended without the blank line that closes an event
        yield "\n".join(data_lines)


def _take_lines(buffer: str) -> tuple[list[str], str]:
    """Split off complete lines; a trailing CR waits, since its LF may come in the next chunk."""
    held = "\r" if buffer.endswith("\r") else ""
    lines = _LINE_END.split(buffer[:len(buffer) - len(held)])
    rest = lines.pop()
    return lines, rest + held


def _feed_line(line: str, data_lines: list[str]) -> str | None:
    if not line:
        event = "\n".join(data_lines) if data_lines else None
        data_lines.clear()
        return event
    name, _, value = line.partition(":")
    if name == "data":  # other fields (event, id, retry) and ":comments" are ignored
        data_lines.append(value[1:] if value.startswith(" ") else value)
    return None


async def read_stream(byte_chunks: AsyncIterable[bytes], record: RequestRecord,
                      clock: Callable[[], float] = time.perf_counter) -> None:
    """Fill `record` from an OpenAI-style SSE body until data: [DONE] or the end of the body."""
    async for data in iter_sse_data(byte_chunks):
        if data.strip() == "[DONE]":
            record.is_done = True
            return
        _apply_chunk(record, json.loads(data), clock())


def _apply_chunk(record: RequestRecord, chunk: object, now: float) -> None:
    if not isinstance(chunk, dict):
        raise RequestFailed(f"unexpected stream event: {str(chunk)[:120]}")
    if chunk.get("error"):
        raise RequestFailed(f"error event in stream: {_error_text(chunk['error'])}")
    if isinstance(chunk.get("usage"), dict):
        _apply_usage(record, chunk["usage"])
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        content, reasoning = _choice_text(choice)
        if content or reasoning:
            record.chunk_times.append(now)
            record.text_parts.append(content)
        if choice.get("finish_reason"):
            record.finish_reason = str(choice["finish_reason"])


def _choice_text(choice: dict) -> tuple[str, str]:
    """(content, reasoning) of a chat delta or completions choice."""
    if isinstance(choice.get("text"), str):
        return choice["text"], ""
    delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
    content = delta.get("content") or ""
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    return (content if isinstance(content, str) else ""), (reasoning if isinstance(reasoning, str) else "")


def _apply_usage(record: RequestRecord, usage: dict) -> None:
    if isinstance(usage.get("prompt_tokens"), int):
        record.prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        record.completion_tokens = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]


def _error_text(body: object) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}, {"detail": ...})."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:200] or "(empty body)"
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            inner = inner.get("message") or inner.get("detail") or inner
        return str(inner)[:200]
    return str(body)[:200]


# ---- one request -----------------------------------------------------------------------------------
class StreamingClient:
    """Sends benchmark requests to one server over a shared connection pool."""

    def __init__(self, config: ClientConfig, max_connections: int):
        self.config = config
        self.http = httpx.AsyncClient(
            headers=config.headers, timeout=httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def build_body(self, request: BenchRequest) -> dict:
        body: dict = {"model": self.config.model, "max_tokens": request.max_tokens, "temperature": 0.0,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.config.endpoint == "chat":
            body["messages"] = list(request.messages)
        else:
            body["prompt"] = to_prompt(request.messages)
        if self.config.ignore_eos:
            body["ignore_eos"] = True
        if request.session_id is not None:
            body["session_id"] = request.session_id
        return body

    async def send(self, request: BenchRequest, is_warmup: bool = False) -> RequestRecord:
        record = RequestRecord(index=request.index, session_id=request.session_id, turn=request.turn,
                               is_warmup=is_warmup, expected_prompt_tokens=request.expected_prompt_tokens)
        body = self.build_body(request)
        record.send_time = time.perf_counter()
        try:
            await asyncio.wait_for(self._stream(body, record), self.config.timeout_s)
        except asyncio.TimeoutError:
            record.error = f"no complete response within --timeout {self.config.timeout_s:g} s"
        except RequestFailed as exc:
            record.error = str(exc)
        except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        record.end_time = time.perf_counter()
        if record.error is None and not record.is_done and record.finish_reason is None:
            record.error = "stream ended before data: [DONE]"
        return record

    async def _stream(self, body: dict, record: RequestRecord) -> None:
        async with self.http.stream("POST", self.config.url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", errors="replace")
                raise RequestFailed(f"HTTP {response.status_code}: {_error_text(text)}")
            await read_stream(response.aiter_bytes(), record)


# ---- server probes ---------------------------------------------------------------------------------
async def list_models(http: httpx.AsyncClient, base_url: str) -> list[str]:
    """Model ids from GET /v1/models; raises httpx.HTTPError when the server cannot be reached."""
    response = await http.get(base_url + "/v1/models")
    if response.status_code != 200:
        return []
    data = response.json().get("data") or []
    return [m["id"] for m in data if isinstance(m, dict) and "id" in m]


async def count_tokens(http: httpx.AsyncClient, base_url: str, model: str, text: str) -> int | None:
    """Token count from POST /tokenize (vLLM/pdserve shape, then llama.cpp's); None if unsupported."""
    for body in ({"model": model, "prompt": text}, {"content": text}):
        try:
            response = await http.post(base_url + "/tokenize", json=body)
            if response.status_code != 200:
                continue
            reply = response.json()
        except (httpx.HTTPError, ValueError):
            continue
        if isinstance(reply.get("count"), int):
            return reply["count"]
        if isinstance(reply.get("tokens"), list):
            return len(reply["tokens"])
    return None


# ---- drivers ---------------------------------------------------------------------------------------
OnDone = Callable[[RequestRecord], None]


async def run_requests(client: StreamingClient, requests: list[BenchRequest], concurrency: int,
                       gaps: list[float], on_done: OnDone, is_warmup: bool = False) -> list[RequestRecord]:
    """Independent requests: arrivals after `gaps`, at most `concurrency` in flight."""
    slots = asyncio.Semaphore(concurrency)

    async def one(request: BenchRequest) -> RequestRecord:
        async with slots:
            record = await client.send(request, is_warmup)
        on_done(record)
        return record

    tasks = []
    for request, gap in zip(requests, gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(request)))
    return list(await asyncio.gather(*tasks))


async def run_sessions(client: StreamingClient, sessions: list[Session], concurrency: int,
                       gaps: list[float], on_done: OnDone) -> list[RequestRecord]:
    """Sessions arrive after `gaps`; at most `concurrency` run at once, each turn after the last."""
    slots = asyncio.Semaphore(concurrency)

    async def one(session: Session) -> list[RequestRecord]:
        async with slots:
            return await _run_session(client, session, on_done)

    tasks = []
    for session, gap in zip(sessions, gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(session)))
    return [record for records in await asyncio.gather(*tasks) for record in records]


async def _run_session(client: StreamingClient, session: Session, on_done: OnDone) -> list[RequestRecord]:
    records = []
    while not session.is_done:
        record = await client.send(session.next_request())
        records.append(record)
        on_done(record)
        if not record.is_success:
            break
        session.record_reply(record.text)
    for turn in range(len(records) + 1, session.num_turns + 1):  # the rest of a failed session
        skipped = RequestRecord(index=session.first_index + turn - 1, session_id=session.session_id, turn=turn,
                                error=f"not sent: turn {len(records)} of its session failed")
        records.append(skipped)
        on_done(skipped)
    return records
