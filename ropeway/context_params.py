"""Per-request long-context settings (extension fields of the request body)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextParams:
    # Like the server's --rope-scaling, e.g. {"rope_type": "dynamic", "factor": 4}; None: the server's.
    rope_scaling: dict | None = None
    # Like the server's --context-policy, e.g. {"type": "sink_window", "sinks": 4, "window": 4096}.
    context_policy: dict | None = None
