"""Per-request long-context settings (extension fields of the request body), parsed once.

Where a request is made (the HTTP schema, the offline API) the raw dicts become a validated
RopeScaling and ContextPolicy here; everything downstream (admission limits, the engine core,
the scheduler) reads the typed objects and never parses again.
"""

from dataclasses import dataclass

from ropeway.scheduler.context_policy import ContextPolicy
from ropeway.scheduler.rope_scaling import RopeScaling


@dataclass(frozen=True)
class ContextParams:
    # Like the server's --rope-scaling, e.g. {"rope_type": "dynamic", "factor": 4}; None: the server's.
    rope_scaling: RopeScaling | None = None
    # Like the server's --context-policy, e.g. {"type": "sink_window", "sinks": 4, "window": 4096};
    # None: the server's.
    context_policy: ContextPolicy | None = None

    def __post_init__(self):
        # A dict is parsed (InvalidParameter names the field); a parsed object passes through.
        if not isinstance(self.rope_scaling, RopeScaling | None):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling, "rope_scaling"))
        if not isinstance(self.context_policy, ContextPolicy | None):
            object.__setattr__(self, "context_policy",
                               ContextPolicy.from_dict(self.context_policy, "context_policy"))
