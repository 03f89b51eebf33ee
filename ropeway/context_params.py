"""Per-request long-context settings (extension fields of the request body)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextParams:
    # Like the server's --rope-scaling, e.g. {"rope_type": "dynamic", "factor": 4}; None: the server's.
    rope_scaling: dict | None = None
