"""The engine core's busy loop: apply the inputs that arrived, run one step, emit its outputs.

The same loop runs on a thread of the API process (tests, `AsyncLLM.in_thread`) and as the main
loop of the engine-core process. Faults tied to one request fail that request alone; a fault in
the step itself leaves the device state unknown, so the loop stops and says so (`fatal`).
"""

import logging
import queue
from collections.abc import Callable

from ropeway.sampling_params import InvalidParameter

from .core import EngineCore
from .messages import AbortRequests, EngineOutputs, EngineRequest, RequestFailure, Shutdown

log = logging.getLogger("ropeway")

IDLE_WAIT_SECONDS = 0.5


class CoreLoop:
    def __init__(self, core: EngineCore, emit: Callable[[EngineOutputs], None]):
        self.core = core
        self.emit = emit
        self.inputs: queue.Queue = queue.Queue()

    def run(self) -> None:
        core = self.core
        try:
            while True:
                failures: list[RequestFailure] = []
                messages = self._take_inputs(block=not core.has_unfinished_requests())
                for message in messages:
                    if isinstance(message, Shutdown):
                        return
                    self._apply(message, failures)
                busy = core.has_unfinished_requests()
                deltas = core.step() if busy else []
                if busy or messages:  # the state changed: a fresh snapshot goes with the outputs
                    self.emit(EngineOutputs(deltas=deltas, failures=failures, stats=core.stats()))
        except BaseException as error:  # noqa: BLE001 -- whatever it was, the API side must hear of it
            log.exception("engine core failed")
            self.emit(EngineOutputs(fatal=f"the engine core failed: {error!r}"))

    def _take_inputs(self, block: bool) -> list:
        taken = []
        try:
            taken.append(self.inputs.get(block=block, timeout=IDLE_WAIT_SECONDS if block else None))
            while True:
                taken.append(self.inputs.get_nowait())
        except queue.Empty:
            return taken

    def _apply(self, message, failures: list[RequestFailure]) -> None:
        if isinstance(message, EngineRequest):
            try:
                self.core.add_request(message)
            except InvalidParameter as error:
                failures.append(RequestFailure(message.request_id, 400, str(error), error.param))
            except Exception as error:  # a request that breaks admission fails alone
                log.exception("admitting request %s failed", message.request_id)
                self.core.abort_request(message.request_id)
                self.core.stats_totals.request_failures += 1
                failures.append(RequestFailure(message.request_id, 500, f"the request failed: {error!r}"))
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self.core.abort_request(request_id)
