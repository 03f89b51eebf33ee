from .async_llm import AsyncLLM, EngineDeadError, tokenizer_from_info
from .core import EngineCore, LoadedModel, load_model
from .core_client import EngineStartError
from .llm import LLM
from .llm_engine import LLMEngine

__all__ = ["AsyncLLM", "EngineCore", "EngineDeadError", "EngineStartError", "LLM", "LLMEngine", "LoadedModel",
           "load_model", "tokenizer_from_info"]
