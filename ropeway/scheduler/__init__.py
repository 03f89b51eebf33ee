from .block_manager import BlockManager
from .context_policy import POLICY_TYPES, QUESTION_QUERY_TOKENS, ContextPolicy
from .host_admission import BlockLoad
from .host_tier import HostTier
from .rope_plan import RopePlan, RopePlanner, bucket_length
from .rope_scaling import ROPE_TYPES, RopeScaling
from .scheduler import (Eviction, Landmark, RopeGrowth, ScheduledSequence, Scheduler, SchedulerConfig,
                        SchedulerOutput)
from .sequence import Sequence, SequenceStatus

__all__ = ["BlockLoad", "BlockManager", "HostTier", "POLICY_TYPES", "QUESTION_QUERY_TOKENS", "ContextPolicy",
           "Eviction", "Landmark", "RopePlan", "RopePlanner", "bucket_length", "ROPE_TYPES", "RopeScaling",
           "RopeGrowth", "ScheduledSequence", "Scheduler", "SchedulerConfig", "SchedulerOutput", "Sequence",
           "SequenceStatus"]
