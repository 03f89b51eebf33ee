"""The engine core as a process of its own (`ropeway serve`), talking to the API server over
ZeroMQ with msgpack-encoded messages.

Threads, as vLLM's engine core has them: one receives and decodes inputs, one encodes and sends
outputs (each owns its socket; sockets are not thread-safe), and the main thread runs the busy
loop, so socket I/O and encoding never hold up a step for longer than the GIL hand-over. The
API process watches this one: if it dies, every open request fails and /health turns 503.
"""

import gc
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from ropeway import fault_injection
from ropeway.config import EngineConfig

from .core import EngineCore
from .core_loop import CoreLoop
from .messages import EngineOutputs, Shutdown, encode, input_decoder

log = logging.getLogger("ropeway")

PARENT_CHECK_MS = 1000

# First frame of each message from the engine core.
READY, FAILED, OUTPUTS = b"ready", b"failed", b"out"


def run_engine_core(config_bytes: bytes, input_address: str, output_address: str, served_model_name: str | None,
                    log_level: str, core_factory: Callable[[EngineConfig], EngineCore] = EngineCore) -> None:
    """The process's main. core_factory builds the core from the config (benchmarks pass one that
    builds a model with random weights)."""
    # The API process decides when to stop (it drains first); a signal to the whole process
    # group (Ctrl-C, a SIGTERM to the group) must not end this one under running requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    context = zmq.Context()
    output_socket = context.socket(zmq.PUSH)
    output_socket.connect(output_address)
    input_socket = context.socket(zmq.PULL)
    input_socket.connect(input_address)
    fault_injection.arm_from_environment()  # tests only; nothing is armed without the variable
    try:
        config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
        core = core_factory(config)
        core.capture_decode_graphs()
    except Exception as error:  # noqa: BLE001 -- reported to the API process, which exits with it
        # The API process logs the reason and exits 2: a bad model path or flag is not a crash.
        log.debug("engine core start-up failed", exc_info=True)
        output_socket.send_multipart([FAILED, str(error).encode()])
        output_socket.close(linger=2000)
        return
    output_socket.send_multipart([READY, encode(core.info(served_model_name))])
    outbox: queue.Queue = queue.Queue()
    if core.workers is not None:
        core.workers.on_worker_death = lambda message: _die(outbox, message)
    loop = CoreLoop(core, outbox.put)
    parent = os.getppid()
    reader = threading.Thread(target=_read_inputs, args=(input_socket, loop.post, parent), daemon=True,
                              name="ropeway-core-inputs")
    writer = threading.Thread(target=_write_outputs, args=(output_socket, outbox), daemon=True,
                              name="ropeway-core-outputs")
    reader.start()
    writer.start()
    # Start-up objects (torch, the model, the tokenizer) live as long as the process: frozen, the
    # collector's full passes never walk them (at 256 streams those passes stalled steps).
    gc.collect()
    gc.freeze()
    loop.run()
    core.shutdown()
    outbox.put(None)
    writer.join(5)


def _die(outbox: queue.Queue, message: str) -> None:
    """A worker died: the device state is unknown. Tell the API process, then exit (rank 0 may be
    stuck in a collective that will never complete)."""
    log.error("%s; the engine core stops", message)
    outbox.put(EngineOutputs(fatal=message))
    time.sleep(0.5)  # let the writer thread send it
    os._exit(1)


def _read_inputs(socket: zmq.Socket, post: Callable[[object], None], parent: int) -> None:
    while True:
        if socket.poll(PARENT_CHECK_MS):
            message = input_decoder.decode(socket.recv())
            post(message)
            if isinstance(message, Shutdown):
                return
        elif os.getppid() != parent:  # the API process is gone: nobody will read our outputs
            post(Shutdown())
            return


def _write_outputs(socket: zmq.Socket, outbox: queue.Queue) -> None:
    while True:
        outputs = outbox.get()
        if outputs is None:
            socket.close(linger=1000)
            return
        socket.send_multipart([OUTPUTS, encode(outputs)], copy=False)
