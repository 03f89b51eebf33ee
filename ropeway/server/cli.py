"""`ropeway serve`: load a model and serve the OpenAI-compatible API.

With no arguments it serves the built-in default model on http://127.0.0.1:8000.
"""

import argparse
import asyncio
import gc
import importlib.metadata
import json
import logging
import os
import re
import signal
import sys

# Only what parsing needs: torch, the engine and the web stack load in serve(), so --help
# and --version answer at once.
from ropeway.config import KV_CACHE_DTYPES, EngineConfig
from ropeway.request_bounds import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger("ropeway")

API_KEY_ENV = "ROPEWAY_API_KEY"
# What builds the engine core in its process; None: EngineCore (benchmarks/serve_random_model.py
# swaps in one that builds random weights).
ENGINE_CORE_FACTORY = None
# Open requests are ended this long before --shutdown-timeout, so their responses finish in time.
SHUTDOWN_CUT_OFF_MARGIN = 1.0
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_size(text: str) -> int:
    """'1073741824', '512MiB', '2GiB', '1.5GB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 512MiB or 2GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as \'{"rope_type": "dynamic", "factor": 4}\'')
    return value


def package_version() -> str:
    try:
        return importlib.metadata.version("ropeway")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
        return "(not installed: a source tree)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropeway", description="ropeway: a long-context LLM inference server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API",
                                description="Serve the OpenAI-compatible API (the built-in default model "
                                            "on 127.0.0.1:8000 when run without arguments).")
    defaults = EngineConfig()

    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    # The key's default is read in serve(), not here, so that --help never prints it.
    server.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer <key>` on /v1 and the tokenizer routes "
                             f"(default: ${API_KEY_ENV} if set, else no key)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use for the model; the first is reported "
                             "(default: the --model argument, or SmolLM2-135M-Instruct)")
    server.add_argument("--max-waiting", type=non_negative_int, default=512,
                        help="sequences that may wait beyond --max-num-seqs; past that, requests get 503 "
                             "(default: 512)")
    server.add_argument("--max-request-bytes", type=memory_size, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body accepted; a larger one gets 413 before it is read "
                             "(default: 32MiB)")
    server.add_argument("--shutdown-timeout", type=non_negative_float, default=30.0,
                        help="on SIGTERM, stop accepting connections and give running requests this many seconds "
                             "to finish before cancelling them; then exit 0 (default: 30)")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                        help="(default: info)")

    engine = serve.add_argument_group("engine")
    engine.add_argument("--model", default=None,
                        help="GGUF file or Hugging Face model directory (default: the built-in SmolLM2-135M-Instruct)")
    engine.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                        help="(default: auto: float32 on CPU, bfloat16 on CUDA)")
    engine.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto (default: auto)")
    engine.add_argument("--max-model-len", type=positive_int, default=None,
                        help="context limit in tokens (default: the model's trained context, capped by the KV pool)")
    engine.add_argument("--rope-scaling", type=json_object, default=None,
                        help='RoPE scaling for every request that sets none, as JSON in Hugging Face\'s form, e.g. '
                             '\'{"rope_type": "dynamic", "factor": 4}\' (default: the model\'s own)')
    engine.add_argument("--context-policy", type=json_object, default=None,
                        help='KV cache policy for unbounded streams, e.g. '
                             '\'{"type": "sink_window", "sinks": 4, "window": 4096}\' (default: none, '
                             'requests past the context are refused); requests may override it')
    engine.add_argument("--session-store-fraction", type=float, default=defaults.session_store_fraction,
                        help="share of the KV pool that may hold retained chat sessions (sink_window) "
                             f"(default: {defaults.session_store_fraction})")
    engine.add_argument("--retrieval-archive-memory", type=memory_size, default=defaults.retrieval_archive_bytes,
                        help="memory for blocks evicted by landmark caches that retrieve, all requests together: "
                             "host copies plus their keys before RoPE on the device (a third of it); over it the "
                             "largest archive forgets its oldest blocks (default: 4GiB)")
    engine.add_argument("--kv-cache-memory", type=memory_size, default=None,
                        help="KV cache pool size, e.g. 2GiB (default: 1GiB on CPU; on CUDA, "
                             "--gpu-memory-utilization of the free memory)")
    engine.add_argument("--kv-host-memory", type=memory_size, default=None,
                        help="host memory (pinned on CUDA) for KV blocks the pool lets go of, prefix-cache blocks "
                             "and retained sessions, LRU; a later hit copies them back instead of recomputing them; "
                             "0 disables (default: 4GiB on CUDA, 0 on CPU; not with --tensor-parallel-size > 1)")
    engine.add_argument("--kv-host-blocks-per-step", type=int, default=defaults.kv_host_blocks_per_step,
                        help="KV blocks a host-tier hit brings back per step while other requests decode: more moves a "
                             "hit faster, fewer keeps each step's share of the work smaller "
                             f"(default: {defaults.kv_host_blocks_per_step})")
    engine.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                        help=f"(default: {defaults.gpu_memory_utilization})")
    engine.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                        help="KV cache storage: auto (the model's dtype) or fp8 (e4m3 with a scale per token and "
                             "KV head: about half the memory per token, so twice the tokens in a pool) "
                             "(default: auto)")
    engine.add_argument("--block-size", type=int, default=defaults.block_size,
                        help=f"tokens per KV block (default: {defaults.block_size})")
    engine.add_argument("--max-num-seqs", type=positive_int, default=defaults.max_num_seqs,
                        help=f"sequences in the running batch at most (default: {defaults.max_num_seqs})")
    engine.add_argument("--max-num-batched-tokens", type=positive_int, default=defaults.max_num_batched_tokens,
                        help=f"tokens per engine step at most (default: {defaults.max_num_batched_tokens})")
    engine.add_argument("--prefill-chunk-size", type=positive_int, default=None,
                        help="prompt tokens per sequence per step at most (default: --max-num-batched-tokens)")
    engine.add_argument("--max-prefill-tokens-with-decodes", type=positive_int,
                        default=defaults.max_prefill_tokens_with_decodes,
                        help="prompt tokens in a step that also decodes, at most: bounds the inter-token latency "
                             "of running streams while prompts queue; --max-num-batched-tokens turns the cap off "
                             "(default: half of --max-num-batched-tokens)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=defaults.enable_prefix_caching, help="(default: on)")
    engine.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="launch each greedy step before reading the previous one's tokens, so the "
                             "host's scheduling and output work overlaps the GPU (default: on on CUDA)")
    engine.add_argument("--sampler-cuda-graphs", action=argparse.BooleanOptionalAction,
                        default=defaults.sampler_cuda_graphs,
                        help="replay a decode step's sampling (temperature, top-p/k, min-p, logprobs) as a CUDA "
                             "graph behind the forward's, instead of its ~40 launches (default: off)")
    engine.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                        help="split the model over this many GPUs (one worker process each beside the engine "
                             "core; gloo processes on CPU) (default: 1)")
    engine.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed for requests that give none (default: {defaults.seed})")
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk_size=args.prefill_chunk_size,
        max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, rope_scaling=args.rope_scaling,
        context_policy=args.context_policy, session_store_fraction=args.session_store_fraction,
        retrieval_archive_bytes=args.retrieval_archive_memory, async_scheduling=args.async_scheduling,
        sampler_cuda_graphs=args.sampler_cuda_graphs,
        kv_host_memory_bytes=args.kv_host_memory, kv_host_blocks_per_step=args.kv_host_blocks_per_step,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def shutting_down():
    from .errors import APIError

    return APIError(503, "the server is shutting down; retry the request", code="server_shutting_down")


def draining_server(config, engine):
    """uvicorn that ends the requests still open just before --shutdown-timeout runs out: each
    stream gets an error frame and [DONE], each waiting client a 503, instead of a connection cut
    mid-stream (uvicorn cancels what is left, which also logs a traceback per request). Built here,
    not at import, so --help does not load uvicorn."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            timeout = self.config.timeout_graceful_shutdown
            cut_off = None
            if timeout is not None:
                cut_off = asyncio.get_running_loop().call_later(max(0.0, timeout - SHUTDOWN_CUT_OFF_MARGIN),
                                                                engine.end_open_requests, shutting_down)
            try:
                await super().shutdown(sockets)
            finally:
                if cut_off is not None:
                    cut_off.cancel()

    return DrainingServer(config)


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from sse_starlette.sse import AppStatus

    from ropeway.engine import AsyncLLM, EngineCore, EngineStartError
    from ropeway.models.default_model import DEFAULT_MODEL_NAME

    from .app import build_app
    from .context import ServerContext, ServerSettings
    from .header_timeout import HeaderTimeoutProtocol

    # As vLLM does, clients name the model by the --model argument unless told otherwise.
    names = tuple(args.served_model_name or [args.model or DEFAULT_MODEL_NAME])
    try:
        config = engine_config(args)
        # The engine core (scheduler, model, KV cache) runs in a process of its own, so the HTTP
        # event loop and the engine's busy loop never share a GIL.
        engine = AsyncLLM.spawn(config, names[0], args.log_level, ENGINE_CORE_FACTORY or EngineCore)
    except (EngineStartError, ValueError) as error:
        log.error("cannot start: %s", error)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(served_model_names=names, api_key=api_key, max_waiting=args.max_waiting,
                              max_request_bytes=args.max_request_bytes)
    ctx = ServerContext.create(engine, settings)
    app = build_app(ctx)
    # Everything allocated so far (the tokenizer, the app, pydantic's schemas) lives as long as the
    # process. Left to the collector, every full collection walks it all on whichever thread
    # allocates, and at 256 streams the outputs each step makes set one off every few seconds: a
    # stall for every stream. Frozen, it is never walked.
    gc.collect()
    gc.freeze()
    engine.start()
    log.info("serving %s at http://%s:%d (OpenAI API under /v1, docs at /docs, metrics at /metrics)%s",
             names[0], args.host, args.port, "; API key required" if settings.api_key else "")
    # sse-starlette would end every open stream as soon as uvicorn sees the signal; draining lets
    # them run to their end, and only --shutdown-timeout cuts them short.
    AppStatus.disable_automatic_graceful_drain()
    server = draining_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                            timeout_graceful_shutdown=args.shutdown_timeout,
                                            http=HeaderTimeoutProtocol), engine)
    # While serving, uvicorn's own handler drains on SIGTERM; once stopped it raises the signal
    # again with this one back in place, so the process exits 0 rather than dying of it. A SIGTERM
    # before uvicorn listens stops it as soon as it has started.
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "should_exit", True))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C the same way, once it has stopped
        pass
    finally:
        ctx.tokenizers.shutdown()
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `ropeway`
        parser.print_help()
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
