from .async_engine import AsyncEngine, EngineDeadError
from .llm import LLM
from .llm_engine import LLMEngine, LoadedModel, load_model

__all__ = ["AsyncEngine", "EngineDeadError", "LLM", "LLMEngine", "LoadedModel", "load_model"]
