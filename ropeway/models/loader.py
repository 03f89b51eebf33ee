"""Find and load a model: a GGUF file, a HF directory, or the built-in default."""

import dataclasses
from pathlib import Path

import torch

from .config import ModelConfig
from .default_model import DEFAULT_MODEL_NAME, default_model_path
from .errors import ModelLoadError
from .gguf_loader import load_gguf
from .hf_loader import load_hf_dir
from .tokenizer import RopewayTokenizer


def load_model_files(model: str | Path | None, dtype: torch.dtype
                     ) -> tuple[ModelConfig, dict[str, torch.Tensor], RopewayTokenizer]:
    path = Path(model) if model else default_model_path()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (ropeway never downloads weights: "
                             "pass a GGUF file or a local Hugging Face directory)")
    if path.is_dir():
        config, weights, tokenizer = load_hf_dir(path, dtype)
    elif path.suffix.lower() == ".gguf":
        config, weights, tokenizer = load_gguf(path, dtype)
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    # Named as the API serves it by default (the --model argument), not by the file's own
    # metadata (the default GGUF calls itself "Smollm2 135M 8k Lc100K Mix1 Ep2").
    return dataclasses.replace(config, name=str(model) if model else DEFAULT_MODEL_NAME), weights, tokenizer
