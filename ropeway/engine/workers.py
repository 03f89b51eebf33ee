"""Tensor-parallel workers: one process per extra GPU (rank 1..N-1), each holding its shard of
the model and of the KV cache. Rank 0 lives in the engine core.

The scheduler runs once, in the engine core. Each step, rank 0 sends every worker the same
step (the batch's host arrays, the key moves of bounded caches, RoPE plans seen for the first
time) over a ZeroMQ socket of its own, then all ranks upload and run the batch; the layers'
collectives (NCCL on GPUs, gloo on CPU) keep them in lockstep. The tokens of a step still in
flight (asynchronous scheduling) reach the workers by a broadcast from rank 0's device. Only
rank 0 samples. If a worker dies, the device state is unknown: the engine core stops.
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

import msgspec
import torch
import torch.distributed as dist
import zmq

from ropeway.config import EngineConfig
from ropeway.models import TensorParallel
from ropeway.scheduler import RopePlan

from .cache_ops import KeyMove
from .host_batch import HostBatch, encode_array
from .kv_pool import KVPoolShape, allocate_kv_cache

log = logging.getLogger("ropeway")


class WorkerInit(msgspec.Struct, tag="init"):
    num_blocks: int
    block_size: int
    bytes_per_block: int


class WorkerStep(msgspec.Struct, tag="step"):
    new_plans: list[RopePlan]       # plans rank 0 saw first this step, in the order it numbered them
    moves: list[KeyMove]
    batch: HostBatch
    num_previous_tokens: int        # > 0: receive the in-flight step's tokens by broadcast first


class CaptureGraphs(msgspec.Struct, tag="capture"):
    max_num_seqs: int


class StopWorker(msgspec.Struct, tag="stop"):
    pass


WorkerMessage = WorkerInit | WorkerStep | CaptureGraphs | StopWorker
_encode = msgspec.msgpack.Encoder(enc_hook=encode_array).encode
_decode = msgspec.msgpack.Decoder(WorkerMessage).decode


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = config.torch_device()
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_process_group(device: torch.device, init_method: str, rank: int, world_size: int) -> TensorParallel:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks on one CPU share its cores: each taking all of them would oversubscribe it
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size)
    return TensorParallel.from_process_group()


class WorkerGroup:
    """Rank 0's handle on the other ranks: started with the engine core, stopped with it."""

    def __init__(self, config: EngineConfig):
        self.world_size = world_size = config.tensor_parallel_size
        self._directory = tempfile.mkdtemp(prefix="ropeway-tp-")
        init_method = f"file://{self._directory}/rendezvous"
        self._zmq = zmq.Context()
        self._sockets = []
        self.processes = []
        spawn = multiprocessing.get_context("spawn")
        config_bytes = msgspec.msgpack.encode(config)
        for rank in range(1, world_size):
            address = f"ipc://{self._directory}/worker-{rank}"
            socket = self._zmq.socket(zmq.PUSH)
            socket.bind(address)
            self._sockets.append(socket)
            process = spawn.Process(target=run_worker, name=f"ropeway-worker-{rank}", daemon=True,
                                    args=(rank, world_size, init_method, config_bytes, address))
            process.start()
            self.processes.append(process)
        self._threads_before = torch.get_num_threads()
        self.tp = init_process_group(rank_device(config, 0), init_method, 0, world_size)
        self._plans_sent = 0
        self._stopping = threading.Event()
        # What to do when a worker dies (the engine-core process reports it and exits).
        self.on_worker_death: Callable[[str], None] = lambda message: log.error("%s", message)
        threading.Thread(target=self._watch, name="ropeway-worker-watch", daemon=True).start()

    def _watch(self) -> None:
        sentinels = {process.sentinel: process for process in self.processes}
        ended = multiprocessing.connection.wait(list(sentinels))
        if not self._stopping.is_set():
            process = sentinels[ended[0]]
            process.join(1)  # its exit code
            self.on_worker_death(f"tensor-parallel worker {process.name} died (exit code {process.exitcode})")

    def send(self, message) -> None:
        payload = _encode(message)
        for socket in self._sockets:
            socket.send(payload, copy=False)

    def init_cache(self, pool: KVPoolShape) -> None:
        self.send(WorkerInit(pool.num_blocks, pool.block_size, pool.bytes_per_block))

    def send_step(self, plans: list[RopePlan], moves: list[KeyMove], batch: HostBatch,
                  previous_tokens: torch.Tensor | None) -> None:
        new_plans = plans[self._plans_sent :]
        self._plans_sent = len(plans)
        holes = batch.int64[5].size
        self.send(WorkerStep(new_plans, moves, batch, previous_tokens.numel() if holes else 0))
        if holes:
            dist.broadcast(previous_tokens.contiguous(), src=0)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.send(StopWorker())
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
        for socket in self._sockets:
            socket.close(linger=0)
        self._zmq.term()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)
        shutil.rmtree(self._directory, ignore_errors=True)


def run_worker(rank: int, world_size: int, init_method: str, config_bytes: bytes, address: str) -> None:
    """A worker process's main: join the group, load this rank's shard, then run what rank 0 sends."""
    from .core import load_model  # the core and the runner import this module
    from .model_runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine core decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
    device = rank_device(config, rank)
    tp = init_process_group(device, init_method, rank, world_size)
    model = load_model(config, tp).model  # this rank's shard, as rank 0 loads its own
    socket = zmq.Context().socket(zmq.PULL)
    socket.connect(address)
    runner = None
    parent = os.getppid()
    while True:
        if not socket.poll(1000):
            if os.getppid() != parent:  # the engine core is gone
                return
            continue
        message = _decode(socket.recv())
        if isinstance(message, StopWorker):
            dist.destroy_process_group()
            return
        if isinstance(message, WorkerInit):
            pool = KVPoolShape(message.num_blocks, message.block_size, message.bytes_per_block)
            kv_cache = allocate_kv_cache(model, pool, config.kv_torch_dtype(model.dtype), device)
            runner = ModelRunner(model, kv_cache, pool.block_size,
                                 config.retrieval_archive_bytes)
        elif isinstance(message, CaptureGraphs):
            if runner.decode_graphs is not None:
                runner.decode_graphs.capture_up_to(message.max_num_seqs)
        else:
            runner.run_worker_step(message)
