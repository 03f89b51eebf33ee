"""Which faults the engine core survives, and how a request's failure is reported.

A fault tied to one request (its admission, scheduling, sampling or output) fails that request
and the engine goes on. A fault of the device (a CUDA error, a device-side assert) leaves the KV
cache and every queued kernel in an unknown state: it stops the engine core.
"""

import torch

from ropeway.sampling_params import InvalidParameter

from .messages import RequestFailure

_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())


def is_device_fault(error: BaseException) -> bool:
    # torch raises AcceleratorError for CUDA errors; older builds raise a RuntimeError that says so.
    return isinstance(error, _ACCELERATOR_ERROR) or (
        isinstance(error, RuntimeError) and ("CUDA error" in str(error) or "device-side assert" in str(error)))


def request_failure(request_id: str, error: Exception, stage: str) -> RequestFailure:
    if isinstance(error, InvalidParameter):
        return RequestFailure(request_id, 400, str(error), error.param)
    return RequestFailure(request_id, 500, f"the request failed while {stage}: {error!r}")


class RequestFailedError(RuntimeError):
    """The engine failed this request (a fault of the server's, not of the request's values)."""


def failure_error(failure: RequestFailure) -> Exception:
    """The exception a caller sees for a failed request."""
    if failure.status == 400:
        return InvalidParameter(failure.param or "request", failure.message)
    return RequestFailedError(failure.message)
