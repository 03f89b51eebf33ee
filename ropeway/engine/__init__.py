from .llm import LLM
from .llm_engine import LLMEngine

__all__ = ["LLM", "LLMEngine"]
