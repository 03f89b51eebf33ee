from .block_manager import BlockManager
from .rope_plan import RopePlan, model_rope_plan
from .scheduler import ScheduledSequence, Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence, SequenceStatus

__all__ = ["BlockManager", "RopePlan", "model_rope_plan", "ScheduledSequence", "Scheduler",
           "SchedulerConfig", "SchedulerOutput", "Sequence", "SequenceStatus"]
