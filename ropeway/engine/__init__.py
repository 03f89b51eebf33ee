from .async_engine import AsyncEngine, EngineDeadError
from .llm import LLM
from .llm_engine import LLMEngine

__all__ = ["AsyncEngine", "EngineDeadError", "LLM", "LLMEngine"]
