from .config import ModelConfig
from .errors import ModelLoadError
from .forward_batch import ForwardBatch
from .llama import Capture, ForwardStopped, LayerCaches, LlamaModel, QueryCapture
from .loader import load_model_files
from .rope import effective_base, rope_inv_freq, rope_parameters
from .tensor_parallel import TensorParallel
from .tokenizer import RopewayTokenizer

__all__ = ["Capture", "ForwardBatch", "ForwardStopped", "LayerCaches", "LlamaModel", "ModelConfig", "ModelLoadError",
           "QueryCapture", "RopewayTokenizer", "TensorParallel", "effective_base", "load_model_files", "rope_inv_freq",
           "rope_parameters"]
