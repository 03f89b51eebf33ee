"""Find and load a model: a GGUF file, a HF directory, or the built-in default."""

from pathlib import Path

import torch

from .config import ModelConfig
from .default_model import default_model_path
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
        return load_hf_dir(path, dtype)
    if path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype)
    raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
