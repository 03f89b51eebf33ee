"""ropeway: a long-context LLM inference server."""

from .config import EngineConfig
from .context_params import ContextParams
from .engine import LLM, LLMEngine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import InvalidParameter, SamplingParams

__all__ = ["ContextParams", "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "InvalidParameter",
           "RequestOutput", "CompletionOutput"]
