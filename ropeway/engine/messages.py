"""What the API server and the engine core say to each other, as typed msgspec structs.

Both directions carry plain data (token ids, numbers, text deltas), never Python objects of
the other side, and are encoded with msgpack: the same structs serve the in-process engine
(offline `LLM`, tests) and the engine-core process behind ZeroMQ.
"""

import msgspec

from ropeway.context_params import ContextParams
from ropeway.outputs import RequestMetrics, TokenLogprob
from ropeway.sampling_params import SamplingParams

from .stats import StatsSnapshot


# ----- API server -> engine core -----

class EngineRequest(msgspec.Struct, tag="add"):
    """A request parsed and checked at the edge (InputProcessor): the engine core trusts its shape."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    context: ContextParams
    arrival_time: float
    prompt: str | None = None   # the prompt's text, when the client sent text


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


EngineInput = EngineRequest | AbortRequests | Shutdown


# ----- engine core -> API server -----

class ChoiceDelta(msgspec.Struct, omit_defaults=True):
    """What one choice gained since its previous delta."""
    index: int
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    cumulative_logprob: float | None = None
    finish_reason: str | None = None       # "stop", "length", "abort"
    stop_reason: str | int | None = None   # the stop string or stop token id that ended it


class RequestDelta(msgspec.Struct, omit_defaults=True):
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    num_evicted_tokens: int = 0
    # Sent once, in the first delta after the whole prompt has been computed.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None  # with it: the k likeliest per token


class RequestFailure(msgspec.Struct):
    """A request the engine core refused or failed; the others go on."""
    request_id: str
    status: int                 # 400: the request's fault; 500: the server's
    message: str
    param: str | None = None


class EngineOutputs(msgspec.Struct, omit_defaults=True):
    deltas: list[RequestDelta] = []
    failures: list[RequestFailure] = []
    stats: StatsSnapshot | None = None
    # The engine core stopped for good (a dead worker, a device fault): every request fails.
    fatal: str | None = None


class TokenizerSpec(msgspec.Struct):
    """Enough to rebuild the engine's tokenizer in the API process without reading the model again."""
    tokenizer_json: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos: bool
    chat_template: str | None


class EngineInfo(msgspec.Struct):
    """What the API side needs to know about the engine core, sent once when it is ready."""
    model_name: str
    architecture: str
    device: str
    dtype: str
    vocab_size: int
    trained_context: int          # the model's max_position_embeddings
    max_model_len: int
    max_model_len_is_explicit: bool  # set by --max-model-len (requests' own scaling may not pass it)
    pool_tokens: int              # what the KV pool holds: no sequence can be longer
    block_size: int
    num_blocks: int
    bytes_per_block: int
    kv_cache_dtype: str           # bfloat16, float32, ... or fp8_e4m3
    max_num_seqs: int
    tensor_parallel_size: int
    default_context_policy: dict  # the server's ContextPolicy as a dict
    default_rope_scaling: dict    # the server's RopeScaling as a dict
    tokenizer: TokenizerSpec
    kv_host_tier_bytes: int = 0   # host memory for blocks the pool lets go of (0: no host tier)


encode = msgspec.msgpack.Encoder().encode
input_decoder = msgspec.msgpack.Decoder(EngineInput)
outputs_decoder = msgspec.msgpack.Decoder(EngineOutputs)
info_decoder = msgspec.msgpack.Decoder(EngineInfo)
