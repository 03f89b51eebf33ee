"""The engine in one process, for offline use and tests: the input processor, the engine core
and the output assembler joined through the same messages the server's processes exchange."""

from ropeway.config import EngineConfig
from ropeway.context_params import ContextParams
from ropeway.outputs import RequestOutput
from ropeway.sampling_params import SamplingParams

from .core import EngineCore, LoadedModel
from .faults import failure_error
from .input_processor import InputProcessor
from .messages import RequestDelta
from .output_assembler import RequestAssembly


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.core = EngineCore(config, loaded)
        self.tokenizer = self.core.tokenizer
        self.input = InputProcessor(self.tokenizer, self.core.limits, self.core.model_config.vocab_size,
                                    self.core.grammar_tokenizer)
        self._assemblies: dict[str, RequestAssembly] = {}

    def __getattr__(self, name: str):
        # The engine core's parts (scheduler, runner, block_manager, pool, requests, ...), which
        # tests and benchmarks inspect.
        return getattr(self.core, name)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    context: ContextParams | None = None) -> None:
        if request_id in self._assemblies:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.input.process(request_id, prompt, params, context)
        self.core.add_request(request)
        self._assemblies[request_id] = RequestAssembly(request_id, request.prompt, request.prompt_token_ids, params.n)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks now; returns its last output (finish_reason 'abort')."""
        delta = self.core.abort_request(request_id)
        return self._assemble([delta])[0] if delta is not None else None

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Raises for a request the engine failed (InvalidParameter for a bad value, else RequestFailedError);
        the other requests stay queued."""
        outputs = self._assemble(self.core.step())
        failures = self.core.take_failures()
        for failure in failures:
            self._assemblies.pop(failure.request_id, None)
        if failures:
            raise failure_error(failures[0])
        return outputs

    def _assemble(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        outputs = []
        for delta in deltas:
            assembly = self._assemblies[delta.request_id]
            if delta.finished:
                del self._assemblies[delta.request_id]
            outputs.append(assembly.apply(delta))
        return outputs
