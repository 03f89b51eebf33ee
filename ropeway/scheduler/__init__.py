from .block_manager import BlockManager
from .rope_plan import RopePlan, RopePlanner, bucket_length
from .rope_scaling import ROPE_TYPES, RopeScaling
from .scheduler import RopeGrowth, ScheduledSequence, Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence, SequenceStatus

__all__ = ["BlockManager", "RopePlan", "RopePlanner", "bucket_length", "ROPE_TYPES", "RopeScaling",
           "RopeGrowth", "ScheduledSequence", "Scheduler", "SchedulerConfig", "SchedulerOutput",
           "Sequence", "SequenceStatus"]
