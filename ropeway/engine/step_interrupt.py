"""Stopping a step that nobody wants any more, between two layers of its forward pass.

The busy loop applies aborts and shutdown between steps, and one step can run for seconds: a
2,048-token prompt chunk on a 2-core CPU takes several. The thread that receives inputs notes
them here as they arrive, so the running step can stop early when the engine is shutting down,
or when every request in it has been aborted (a client that went away from a long prompt).
A step that still serves anyone runs to its end.
"""

import threading
from collections.abc import Callable, Iterable

from .messages import AbortRequests, Shutdown


class StepInterrupt:
    def __init__(self):
        self._lock = threading.Lock()
        self._shutting_down = False
        self._aborted: set[str] = set()  # noted on arrival, forgotten once the loop applied them

    def note(self, message) -> None:
        """An input message as it arrives, on whichever thread receives it."""
        if isinstance(message, Shutdown):
            self._shutting_down = True
        elif isinstance(message, AbortRequests):
            with self._lock:
                self._aborted.update(message.request_ids)

    def applied(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            self._aborted.difference_update(request_ids)

    def keep_going_for(self, request_ids: set[str]) -> Callable[[], bool]:
        """What a step serving request_ids asks before each layer."""
        def keep_going() -> bool:
            if self._shutting_down:
                return False
            with self._lock:
                return not request_ids <= self._aborted
        return keep_going
