"""Cancel a non-streaming request's work when its client goes away."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

from pd.openai.errors import OpenAIError

T = TypeVar("T")
_POLL_S = 0.25


class ClientDisconnected(OpenAIError):
    def __init__(self) -> None:
        super().__init__(499, "client closed the request", "invalid_request_error")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it (which aborts its engine
    requests and frees their blocks) and raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
