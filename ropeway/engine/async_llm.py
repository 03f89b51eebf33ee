"""The API server's side of the engine: requests in as typed messages, an asyncio stream of
RequestOutputs per request out.

The engine core runs in a process of its own (`AsyncLLM.spawn`, what `ropeway serve` does) or
on a thread of this one (`AsyncLLM.in_thread`, for tests and embedding); either way it gets the
same messages. Outputs arrive on a background thread (the core's socket reader, or the core's
own thread), are assembled per request there, and reach each event loop with one
`call_soon_threadsafe` per loop and step.
"""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable

from ropeway.config import EngineConfig
from ropeway.context_params import ContextParams
from ropeway.models.tokenizer import RopewayTokenizer
from ropeway.outputs import RequestOutput
from ropeway.sampling_params import SamplingParams
from ropeway.scheduler import ContextPolicy, RopeScaling

from .core import EngineCore
from .core_client import CoreProcess
from .core_thread import CoreThread
from .faults import RequestFailedError, failure_error
from .input_processor import InputProcessor
from .limits import ContextLimits
from .messages import AbortRequests, EngineInfo, EngineOutputs
from .output_assembler import RequestAssembly
from .stats import StatsSnapshot

log = logging.getLogger("ropeway")


class EngineDeadError(RuntimeError):
    """The engine core has stopped; no request can be served."""


def tokenizer_from_info(info: EngineInfo) -> RopewayTokenizer:
    from tokenizers import Tokenizer

    spec = info.tokenizer
    return RopewayTokenizer(Tokenizer.from_str(spec.tokenizer_json), bos_token_id=spec.bos_token_id,
                            eos_token_ids=spec.eos_token_ids, add_bos=spec.add_bos, chat_template=spec.chat_template)


def limits_from_info(info: EngineInfo) -> ContextLimits:
    return ContextLimits(info.max_model_len, info.max_model_len_is_explicit, info.trained_context, info.pool_tokens,
                         info.block_size, ContextPolicy(**info.default_context_policy),
                         RopeScaling(**info.default_rope_scaling), info.tensor_parallel_size)


class AsyncLLM:
    def __init__(self, core: CoreProcess | CoreThread, tokenizer: RopewayTokenizer | None = None):
        self.core = core
        self.info = core.info
        self.tokenizer = tokenizer or tokenizer_from_info(self.info)
        self.limits = limits_from_info(self.info)
        self.input = InputProcessor(self.tokenizer, self.limits, self.info.vocab_size)
        self.stats = StatsSnapshot()
        self.fatal: str | None = None
        # Called on the output thread with each snapshot (metrics); must be quick and never raise.
        self.stats_listeners: list = []
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop, RequestAssembly]] = {}
        self._ids = itertools.count()
        self._started = False

    @classmethod
    def spawn(cls, config: EngineConfig, served_model_name: str | None = None, log_level: str = "info",
              core_factory: Callable[[EngineConfig], EngineCore] = EngineCore) -> "AsyncLLM":
        """The engine core in a process of its own; returns once it has loaded the model. core_factory
        (a module-level callable: it crosses to the new process by name) builds the core there."""
        return cls(CoreProcess(config, served_model_name, log_level, core_factory))

    @classmethod
    def in_thread(cls, engine, served_model_name: str | None = None) -> "AsyncLLM":
        """The engine core of an in-process LLMEngine (or EngineCore), run on a thread of this process."""
        core = getattr(engine, "core", engine)
        return cls(CoreThread(core, served_model_name), core.tokenizer)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.core.start(self._on_outputs)

    def shutdown(self, timeout: float = 10.0) -> None:
        self.core.shutdown(timeout)

    @property
    def is_alive(self) -> bool:
        return self._started and self.fatal is None and self.core.is_alive()

    # ----- the caller's side (any event loop) -----

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Raises InvalidParameter naming the field for a constraint that cannot compile (or run
        with the request's other settings): a server calls it before a stream opens."""
        self.input.grammars.check(params)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       context: ContextParams | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes. Leaving the iteration early (a client that
        went away, a cancelled task) aborts the request. Raises InvalidParameter for a request
        the engine refuses, EngineDeadError if the engine core stops meanwhile."""
        if not self.is_alive:
            raise EngineDeadError(self.fatal or "the engine is not running")
        request_id = request_id or self.new_request_id()
        request = self.input.process(request_id, prompt, params, context)
        sink: asyncio.Queue = asyncio.Queue()
        assembly = RequestAssembly(request_id, request.prompt, request.prompt_token_ids, params.n)
        self._sinks[request_id] = (sink, asyncio.get_running_loop(), assembly)
        self.core.send(request)
        finished = False
        error: BaseException | None = None
        try:
            while True:
                item = error or await sink.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing left to abort
                    raise item
                # A reader that fell behind the engine takes what has queued up as one output
                # (its deltas joined): one frame for several tokens, so a busy event loop sheds
                # work instead of falling further behind.
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
            self._sinks.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if self.is_alive:
            self.core.send(AbortRequests([request_id]))

    def end_open_requests(self, make_error: Callable[[], Exception]) -> None:
        """Abort every open request in the engine and raise make_error() in each one's generate() (a
        server that stops before they finish: their responses end with it instead of being cut)."""
        request_ids = list(self._sinks)
        if request_ids and self.is_alive:
            self.core.send(AbortRequests(request_ids))
        for request_id in request_ids:
            sink, loop, _ = self._sinks[request_id]
            loop.call_soon_threadsafe(sink.put_nowait, make_error())

    # ----- the output thread -----

    def _on_outputs(self, outputs: EngineOutputs) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}

        def deliver(request_id: str, item) -> None:
            target = self._sinks.get(request_id)
            if target is not None:
                by_loop.setdefault(target[1], []).append((target[0], item))

        for delta in outputs.deltas:
            target = self._sinks.get(delta.request_id)
            if target is not None:
                try:
                    item = target[2].apply(delta)
                except Exception as error:  # one request's output fails it alone, never this thread
                    log.exception("assembling the output of request %s failed", delta.request_id)
                    self.abort(delta.request_id)
                    item = RequestFailedError(f"the request failed while assembling its output: {error!r}")
                deliver(delta.request_id, item)
        for failure in outputs.failures:
            deliver(failure.request_id, failure_error(failure))
        if outputs.fatal is not None:
            self.fatal = outputs.fatal
            log.error("%s; every open request fails and /health answers 503", outputs.fatal)
            for request_id in list(self._sinks):
                deliver(request_id, EngineDeadError(outputs.fatal))
        if outputs.stats is not None:
            self.stats = outputs.stats
            for listener in self.stats_listeners:
                try:
                    listener(outputs.stats)
                except Exception:  # a listener never stops the delivery of outputs
                    log.exception("stats listener failed")
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # that event loop is closed: nobody is listening
                for request_id in [r for r, (_, owner, _) in self._sinks.items() if owner is loop]:
                    self._sinks.pop(request_id, None)


def _put_all(deliveries: list) -> None:
    for sink, item in deliveries:
        sink.put_nowait(item)
