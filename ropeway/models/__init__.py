from .config import ModelConfig
from .errors import ModelLoadError
from .forward_batch import ForwardBatch
from .llama import Capture, LlamaModel
from .loader import load_model_files
from .tensor_parallel import TensorParallel
from .tokenizer import RopewayTokenizer

__all__ = ["ModelConfig", "ModelLoadError", "ForwardBatch", "Capture", "LlamaModel", "load_model_files",
           "RopewayTokenizer", "TensorParallel"]
