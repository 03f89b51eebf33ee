"""Offline generation: `LLM(model=..., dtype=...).generate(prompts, SamplingParams(...))`."""

from tqdm import tqdm

from ropeway.config import EngineConfig
from ropeway.context_params import ContextParams
from ropeway.outputs import RequestOutput
from ropeway.sampling_params import SamplingParams

from .llm_engine import LLMEngine


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", *, engine: LLMEngine | None = None,
                 **engine_options):
        """Options are EngineConfig's fields; or pass a ready `engine`."""
        self.engine = engine or LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, context: ContextParams | list[ContextParams] | None = None
                 ) -> list[RequestOutput]:
        """Prompts are strings or lists of token ids; outputs come back in the same order.
        A progress bar counts finished requests, as vLLM's does (use_tqdm=False hides it)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        contexts = context if isinstance(context, list) else [context] * len(prompts)
        ids = []
        for prompt, params, ctx in zip(prompts, sampling_params, contexts):
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, prompt, params, ctx)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), disable=not use_tqdm, desc="generating") as progress:
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            progress.update(1)
        finally:  # one failed request fails the call: the rest of its requests stop too
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
