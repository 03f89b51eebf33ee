"""The API process's handle on the engine-core process: spawn it, send it messages, read its
outputs on a thread, and notice when it dies."""

import logging
import multiprocessing
import shutil
import tempfile
import threading
from collections.abc import Callable

import zmq

from ropeway.config import EngineConfig

from .core import EngineCore
from .core_process import FAILED, OUTPUTS, READY, run_engine_core
from .messages import EngineInfo, EngineOutputs, Shutdown, encode, info_decoder, outputs_decoder

log = logging.getLogger("ropeway")

POLL_MS = 100  # how often the reader checks that the engine core still lives


class EngineStartError(RuntimeError):
    """The engine core could not start (a bad model path or flag); the message says why."""


class CoreProcess:
    def __init__(self, config: EngineConfig, served_model_name: str | None = None, log_level: str = "info",
                 core_factory: Callable[[EngineConfig], EngineCore] = EngineCore):
        self._directory = tempfile.mkdtemp(prefix="ropeway-")
        input_address, output_address = f"ipc://{self._directory}/inputs", f"ipc://{self._directory}/outputs"
        self._zmq = zmq.Context()
        self._input_socket = self._zmq.socket(zmq.PUSH)
        self._input_socket.bind(input_address)
        self._output_socket = self._zmq.socket(zmq.PULL)
        self._output_socket.bind(output_address)
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(target=run_engine_core, name="ropeway-engine-core",
                                     args=(encode(config), input_address, output_address, served_model_name,
                                           log_level, core_factory))
        self.process.start()
        self.info: EngineInfo = self._wait_until_ready()

    def _wait_until_ready(self) -> EngineInfo:
        while True:
            if self._output_socket.poll(POLL_MS):
                kind, payload = self._output_socket.recv_multipart()
                if kind == READY:
                    return info_decoder.decode(payload)
                self._close()
                raise EngineStartError(payload.decode() if kind == FAILED else f"unexpected message {kind!r}")
            if not self.process.is_alive():
                self._close()
                raise EngineStartError(f"the engine core exited during start-up (exit code {self.process.exitcode})")

    def start(self, on_outputs: Callable[[EngineOutputs], None]) -> None:
        self._reader = threading.Thread(target=self._read, args=(on_outputs,), name="ropeway-core-reader",
                                        daemon=True)
        self._reader.start()

    def _read(self, on_outputs: Callable[[EngineOutputs], None]) -> None:
        socket = self._output_socket
        while not self._stopping.is_set():
            if socket.poll(POLL_MS):
                kind, payload = socket.recv_multipart(copy=False)
                if kind.bytes == OUTPUTS:
                    on_outputs(outputs_decoder.decode(payload.buffer))
            elif not self.process.is_alive():
                if not self._stopping.is_set():
                    on_outputs(EngineOutputs(fatal=f"the engine core process exited (exit code "
                                                   f"{self.process.exitcode})"))
                return

    def send(self, message) -> None:
        with self._send_lock:
            self._input_socket.send(encode(message))

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self.process.is_alive():
            try:
                self.send(Shutdown())
            except zmq.ZMQError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("the engine core did not stop in %.0f s; killing it", timeout)
                self.process.kill()
                self.process.join(5)
        if self._reader is not None:
            self._reader.join(2)
        self._close()

    def _close(self) -> None:
        self._input_socket.close(linger=0)
        self._output_socket.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._directory, ignore_errors=True)
