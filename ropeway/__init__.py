"""ropeway: a long-context LLM inference server."""

import importlib

# Imported on first use, so that `ropeway --help` (and anything else that needs only a
# submodule) does not load torch and the engine.
_EXPORTS = {
    "ContextParams": ".context_params",
    "LLM": ".engine",
    "LLMEngine": ".engine",
    "EngineConfig": ".config",
    "SamplingParams": ".sampling_params",
    "InvalidParameter": ".sampling_params",
    "RequestOutput": ".outputs",
    "CompletionOutput": ".outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ropeway' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
