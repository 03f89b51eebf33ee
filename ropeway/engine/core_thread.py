"""The engine core on a thread of this process: for tests and in-process async use. It takes
the same messages as the engine-core process, without encoding them."""

import threading
from collections.abc import Callable

from .core import EngineCore
from .core_loop import CoreLoop
from .messages import EngineInfo, EngineOutputs, Shutdown


class CoreThread:
    def __init__(self, core: EngineCore, served_model_name: str | None = None):
        self.core = core
        self.info: EngineInfo = core.info(served_model_name)
        self._loop: CoreLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_outputs: Callable[[EngineOutputs], None]) -> None:
        self._loop = CoreLoop(self.core, on_outputs)
        self._thread = threading.Thread(target=self._loop.run, name="ropeway-engine-core", daemon=True)
        self._thread.start()

    def send(self, message) -> None:
        self._loop.post(message)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.post(Shutdown())
            self._thread.join(timeout)
        self.core.shutdown()
