"""Server-sent events as OpenAI streams them, and the interleaving of a response's requests.

A response may gather several engine requests (one per prompt of a batched completion);
`merge` reads them concurrently. Leaving `merge` early, as a disconnected client does,
cancels every reader, and each cancelled `AsyncEngine.generate` aborts its request.
"""

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from ropeway.engine import EngineDeadError
from ropeway.sampling_params import InvalidParameter

from .admission import Ticket
from .errors import APIError
from .protocol import ErrorResponse, PromptTokensDetails, Usage

log = logging.getLogger("ropeway.server")

T = TypeVar("T")
_END = object()
DONE = "[DONE]"
DISCONNECT_POLL_SECONDS = 0.5
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads the reply


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) in the order items arrive; the first error is raised."""
    if len(streams) == 1:
        # The common response (one prompt, one choice) reads its stream directly: a reader
        # task and a queue hop per item cost the event loop more than the item's own frame.
        stream = streams[0]
        try:
            async for item in stream:
                yield 0, item
        finally:
            # Closing runs the stream's cleanup (abort) synchronously: nothing in it awaits.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        except Exception as error:
            queue.put_nowait((index, error))
        else:
            queue.put_nowait((index, _END))

    readers = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(readers)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        # No await here: under a cancelled scope it would be cancelled again at once.
        for reader in readers:
            reader.cancel()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidParameter):
        return APIError.from_invalid_parameter(error)
    if isinstance(error, EngineDeadError):
        return APIError(503, "the engine is not running")
    log.error("request failed", exc_info=error)
    return APIError(500, "internal server error; the server log has the details")


async def _events(chunks: AsyncIterator[BaseModel], ticket: Ticket) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk.model_dump_json()
    except Exception as error:
        yield ErrorResponse(error=as_api_error(error).detail()).model_dump_json()
    finally:
        ticket.release()
    yield DONE


def event_stream(chunks: AsyncIterator[BaseModel], ticket: Ticket) -> EventSourceResponse:
    """An SSE response of `data: {json}` frames ending with `data: [DONE]`; a failure midway
    becomes an error frame (OpenAI's error object) before [DONE]."""
    events = _events(chunks, ticket)
    # A client that leaves before the first frame can cancel the response before the generator
    # ever starts, and then its `finally` never runs: release the ticket when it is collected.
    weakref.finalize(events, ticket.release)
    return EventSourceResponse(events, sep="\n")


async def unless_disconnected(request: Request, make_result: Callable[[], Awaitable[T]]) -> T | None:
    """Run make_result(); cancel it (aborting its engine requests) and return None if the
    client goes away first. Streams notice disconnects by themselves; this is for the rest."""
    task = asyncio.ensure_future(make_result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


async def final_outputs(streams: list[AsyncIterator[T]]) -> list[T]:
    """The last item of each stream, read concurrently."""
    finals: list[T | None] = [None] * len(streams)
    async for index, item in merge(streams):
        finals[index] = item
    return finals


async def respond(request: Request, streaming: bool, streams: list[AsyncIterator[T]],
                  chunks: Callable[[], AsyncIterator[BaseModel]], whole: Callable[[list[T]], BaseModel],
                  ticket: Ticket):
    """An SSE stream of chunks(), or, once every stream has finished, whole(last outputs);
    a client that leaves first gets nothing and its requests are aborted."""
    if streaming:
        return event_stream(chunks(), ticket)
    try:
        finals = await unless_disconnected(request, lambda: final_outputs(streams))
    finally:
        ticket.release()
    return whole(finals) if finals is not None else Response(status_code=CLIENT_CLOSED_REQUEST)
