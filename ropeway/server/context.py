"""What every route needs: the engine, the tokenizer, names, limits, metrics and the gate."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ropeway.context_params import ContextParams
from ropeway.engine import AsyncLLM
from ropeway.outputs import RequestOutput
from ropeway.request_bounds import DEFAULT_MAX_REQUEST_BYTES
from ropeway.sampling_params import InvalidParameter, SamplingParams

from .admission import AdmissionGate
from .errors import APIError
from .metrics import ServerMetrics
from .tokenizer_pool import TokenizerPool


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_waiting: int = 512
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass
class ServerContext:
    engine: AsyncLLM
    settings: ServerSettings
    metrics: ServerMetrics
    gate: AdmissionGate
    tokenizers: TokenizerPool
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, engine: AsyncLLM, settings: ServerSettings) -> "ServerContext":
        metrics = ServerMetrics(engine.info, settings.served_model_names[0])
        engine.stats_listeners.append(metrics.observe_engine)
        gate = AdmissionGate(engine.info.max_num_seqs, settings.max_waiting)
        return cls(engine, settings, metrics, gate, TokenizerPool(engine.tokenizer, engine.info))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    @property
    def trained_context_len(self) -> int:
        return self.engine.info.trained_context

    @property
    def default_context_policy(self) -> dict:
        return dict(self.engine.info.default_context_policy)

    @property
    def max_num_seqs(self) -> int:
        return self.engine.info.max_num_seqs

    @property
    def vocab_size(self) -> int:
        return self.engine.info.vocab_size

    def require_engine(self) -> None:
        # Checked up front so a stream is refused with a status, not opened only to fail.
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running")

    def resolve_model(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None or requested in self.settings.served_model_names:
            return self.model_name
        raise APIError(404, f"The model `{requested}` does not exist. This server serves "
                            f"{', '.join(self.settings.served_model_names)}.",
                       param="model", code="model_not_found")

    def check_n(self, n: int) -> None:
        # More choices than the batch holds could never run together; refuse rather than trickle.
        if n > self.max_num_seqs:
            raise APIError.bad_request(f"n must be at most {self.max_num_seqs} (the server's --max-num-seqs)", "n")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        try:
            self.engine.input.check_token_ids(token_ids, param)
        except InvalidParameter as error:
            raise APIError.from_invalid_parameter(error) from error

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str,
                     context: ContextParams | None) -> None:
        """Also validates the request's RoPE scaling, which can lower its context limit."""
        self.engine.limits.check(num_prompt_tokens, max_tokens, context, param)

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """On a thread: a grammar's check takes milliseconds, the first one also builds llguidance's
        tokenizer (about a second); the event loop serves other requests meanwhile."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.engine.check_structured_outputs, params)

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 context: ContextParams | None) -> AsyncIterator[RequestOutput]:
        return self.metrics.tracked(self.engine.generate(prompt_token_ids, params, request_id, context), params.n)
