"""The engine core's busy loop: apply the inputs that arrived, run one step, emit its outputs.

The same loop runs on a thread of the API process (tests, `AsyncLLM.in_thread`) and as the main
loop of the engine-core process. Faults tied to one request (admitting, scheduling, sampling,
reporting it) fail that request alone (engine/faults.py); so does a fault in the stats snapshot,
which only costs the API side one update. Any other fault in the step (the model's forward pass,
a device error) leaves the device state unknown, so the loop stops and says so (`fatal`).
"""

import logging
import queue
from collections.abc import Callable

from ropeway import fault_injection

from .core import EngineCore
from .messages import AbortRequests, EngineOutputs, EngineRequest, Shutdown
from .stats import StatsSnapshot
from .step_interrupt import StepInterrupt

log = logging.getLogger("ropeway")

IDLE_WAIT_SECONDS = 0.5


class CoreLoop:
    def __init__(self, core: EngineCore, emit: Callable[[EngineOutputs], None]):
        self.core = core
        self.emit = emit
        self.inputs: queue.Queue = queue.Queue()
        self.interrupt = StepInterrupt()

    def post(self, message) -> None:
        """Hand the loop an input, from any thread: it is applied before the next step, and an
        abort or shutdown may stop the running step early (engine/step_interrupt.py)."""
        self.interrupt.note(message)
        self.inputs.put(message)

    def run(self) -> None:
        core = self.core
        try:
            while True:
                messages = self._take_inputs(block=not core.has_unfinished_requests())
                for message in messages:
                    if isinstance(message, Shutdown):
                        return
                    self._apply(message)
                busy = core.has_unfinished_requests()
                deltas = core.step(self.interrupt) if busy else []
                if busy or messages:  # the state changed: a fresh snapshot goes with the outputs
                    self.emit(EngineOutputs(deltas=deltas, failures=core.take_failures(), stats=self._stats()))
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

    def _apply(self, message) -> None:
        if isinstance(message, EngineRequest):
            try:
                self.core.add_request(message)
            except Exception as error:  # a request that breaks admission fails alone
                self.core.fail_request(message.request_id, error, "admitting")
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self.core.abort_request(request_id)
            self.interrupt.applied(message.request_ids)

    def _stats(self) -> StatsSnapshot | None:
        try:
            fault_injection.check("stats")
            return self.core.stats()
        except Exception:  # the API side keeps its previous snapshot until the next one
            log.exception("the engine's stats snapshot failed")
            return None
