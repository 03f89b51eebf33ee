import os

import torch

# Triton kernels run under the interpreter on CPU; the variable must be set before any
# module defining @triton.jit kernels is imported. On a CUDA machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
