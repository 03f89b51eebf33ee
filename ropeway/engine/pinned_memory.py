"""Host memory pinned at exactly the size asked for.

torch's pinned tensors come from its caching host allocator, which rounds every request up to a
power of two: a 40 GiB host tier would pin 64 GiB. An ordinary allocation pinned with
cudaHostRegister holds the bytes asked for and no more, and copies between it and the device are
as asynchronous as from any pinned memory. It is pinned once, at start-up: pinning pages later
would hold up whatever runs meanwhile.
"""

import weakref

import torch


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, zeroed: bool = False) -> torch.Tensor:
    """An uninitialized (or zeroed) host tensor, page-locked for asynchronous copies to and from the GPU."""
    tensor = torch.zeros(shape, dtype=dtype) if zeroed else torch.empty(shape, dtype=dtype)
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return tensor
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0))
    if error != 0:
        raise RuntimeError(f"pinning {nbytes} bytes of host memory for the KV host tier failed (cudaError {error}): "
                           "lower --kv-host-memory")
    # Unpinned when the tensor goes, before its memory returns to the allocator.
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor
