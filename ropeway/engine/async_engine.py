"""The engine loop on its own thread, with an asyncio stream of outputs per request.

The HTTP side never waits on the model: it posts commands (add, abort) to a thread-safe
queue and reads outputs from per-request asyncio queues that the loop thread fills with
one `call_soon_threadsafe` per event loop and step. Aborts are applied before the next step, so an abandoned
request's blocks are free within one engine step.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ropeway.context_params import ContextParams
from ropeway.outputs import RequestOutput
from ropeway.sampling_params import SamplingParams

from .llm_engine import LLMEngine

log = logging.getLogger("ropeway")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    context: ContextParams | None = None


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ropeway-engine", daemon=True)
        self.error: BaseException | None = None
        # Called on the loop thread after each step (metrics); must be quick.
        self.step_listeners: list = []

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopping.set()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ----- the caller's side (any event loop) -----

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None,
                       context: ContextParams | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes. Leaving the iteration early (a client that
        went away, a cancelled task) aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        request_id = request_id or self.new_request_id()
        sink: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt, params, sink, asyncio.get_running_loop(), context))
        finished = False
        error: BaseException | None = None
        try:
            while True:
                item = error or await sink.get()
                if isinstance(item, BaseException):
                    raise item
                # A reader that fell behind the engine takes what has queued up as one output
                # (its deltas joined): one frame for several tokens, so a busy event loop
                # sheds work instead of falling further behind.
                while not item.finished and not sink.empty():
                    later = sink.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item = later.merged_after(item)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ----- the loop thread -----

    def _deliver(self, request_id: str, item) -> None:
        target = self._sinks.get(request_id)
        if target is None:
            return
        sink, loop = target
        try:
            loop.call_soon_threadsafe(sink.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self._sinks.pop(request_id, None)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """One wake-up per event loop for a whole step's outputs: a wake-up per output costs a
        self-pipe write and a loop iteration each, hundreds per step at high concurrency."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            target = self._sinks.get(output.request_id)
            if output.finished:
                self._sinks.pop(output.request_id, None)
            if target is not None:
                by_loop.setdefault(target[1], []).append((target[0], output))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # that event loop is closed: nobody is listening
                for request_id in [r for r, (_, owner) in self._sinks.items() if owner is loop]:
                    self._sinks.pop(request_id)

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            self._sinks[command.request_id] = (command.sink, command.loop)
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params, command.context)
            except Exception as error:  # a bad request fails alone, the loop goes on
                self._deliver(command.request_id, error)
                self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._sinks.pop(command.request_id, None)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    command = self._commands.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    command = False
                while command is not False:
                    if command is None:
                        return
                    self._apply(command)
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = False
                if self.engine.has_unfinished_requests():
                    self._deliver_step(self.engine.step())
                for listener in self.step_listeners:
                    listener(self.engine)
        except BaseException as error:
            log.exception("engine loop failed")
            self.error = error
            for request_id in list(self._sinks):
                self._deliver(request_id, EngineDeadError(f"engine loop failed: {error!r}"))


def _put_all(deliveries: list) -> None:
    for sink, item in deliveries:
        sink.put_nowait(item)
