"""Engine configuration: one frozen dataclass, built from CLI flags or keyword arguments."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch.<name>; torch itself is imported only where a device or dtype is made, so the CLI's
# --help reads these defaults without loading it.
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CUDA_KV_HOST_BYTES = 4 << 30
# Blocks a host-tier hit brings back per step while others decode (SchedulerConfig.host_blocks_per_step
# says what it trades): on the H200 a 32k-token turn from the host took 274 / 248 / 223 ms at 128 / 256 /
# 512, with no worse stalls of other streams (BENCHMARKS.md, issue 20).
DEFAULT_KV_HOST_BLOCKS_PER_STEP = 512
# auto: the model's dtype; fp8 (fp8_e4m3 is the same): kernels/fp8_kv.py.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None              # GGUF file or HF directory; None: the built-in default
    dtype: str = "auto"                   # float32 | bfloat16 | float16 | auto (fp32 on CPU, bf16 on CUDA)
    device: str = "auto"                  # cpu | cuda | auto
    kv_cache_dtype: str = "auto"          # auto (the model's dtype) | fp8 (e4m3, scale per token and KV head)
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # KV pool size; default 1 GiB on CPU
    gpu_memory_utilization: float = 0.9   # on CUDA without a byte budget: this fraction of free memory
    max_model_len: int | None = None      # default: the model's trained context (capped by the pool)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int | None = None  # default: the whole token budget
    # Prompt tokens in a step that also carries decodes, at most; None: half the token budget (a
    # mixed step's prompt share sets every running stream's worst inter-token gap; BENCHMARKS.md).
    max_prefill_tokens_with_decodes: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0                         # seeds the streams of requests that give no seed
    rope_scaling: dict | None = None      # e.g. {"rope_type": "dynamic", "factor": 4}; None: the model's own
    context_policy: dict | None = None    # e.g. {"type": "sink_window", "sinks": 4, "window": 4096}; None: none
    session_store_fraction: float = 0.25  # at most this share of the KV pool holds retained chat sessions
    retrieval_archive_bytes: int = 4 << 30  # blocks evicted by landmark caches with `retrieve`: host + device
    # Host memory for KV blocks the pool lets go of (prefix cache, sessions); 0: none.
    # None: DEFAULT_CUDA_KV_HOST_BYTES on CUDA, 0 on CPU (there the pool is host memory already).
    kv_host_memory_bytes: int | None = None
    # Blocks brought back from the host tier in a step that carries decodes, at most (SchedulerConfig's).
    kv_host_blocks_per_step: int = DEFAULT_KV_HOST_BLOCKS_PER_STEP
    # Launch step N+1 before reading step N's tokens (greedy steps); None: on CUDA only.
    async_scheduling: bool | None = None
    # On CUDA, replay the sampler's device work of a decode step as a CUDA graph (sampler_graphs.py)
    # instead of launching its ops one by one. Off by default until measured on the H200.
    sampler_cuda_graphs: bool = False
    # Ranks the model is split over (one GPU each; processes over gloo on CPU).
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto; got {self.device!r}")
        if self.block_size not in (8, 16, 32, 64, 128, 256):
            raise ValueError("block_size must be a power of two from 8 to 256")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.kv_host_memory_bytes is not None and self.kv_host_memory_bytes < 0:
            raise ValueError("kv_host_memory_bytes must be >= 0")
        if self.kv_host_blocks_per_step < 1:
            raise ValueError("kv_host_blocks_per_step must be >= 1")
        if self.kv_host_memory_bytes and self.tensor_parallel_size > 1:
            raise ValueError("--kv-host-memory is not supported with --tensor-parallel-size > 1 (give 0)")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs, "
                             "so every running sequence can decode each step")

    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def kv_host_bytes(self, device: "torch.device") -> int:
        if self.kv_host_memory_bytes is not None:
            return self.kv_host_memory_bytes
        if device.type != "cuda" or self.tensor_parallel_size > 1:
            return 0
        return DEFAULT_CUDA_KV_HOST_BYTES

    def uses_async_scheduling(self, device: "torch.device") -> bool:
        return device.type == "cuda" if self.async_scheduling is None else self.async_scheduling

    def kv_torch_dtype(self, model_dtype: "torch.dtype") -> "torch.dtype":
        """What the KV pool stores: the model's dtype, or torch.float8_e4m3fn."""
        import torch

        return model_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn

    def torch_dtype(self, device: "torch.device") -> "torch.dtype":
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
