"""Running a small CPU op on the calling thread alone.

torch's CPU flash attention splits its work over the intra-op thread pool whenever there are
two or more (batch, head, query block) items, however little each holds; a decode step at a
short context is a few microseconds of work per layer. Each such parallel region wakes the
pool's other threads and waits for them, and on a machine with more runnable threads than
cores that wait is a scheduler time slice: measured on a loaded 2-core box, 15-40 ms per call
against 0.02 ms on one thread. Elementwise ops avoid this by not splitting below ATen's grain
size; `one_thread` gives attention the same rule. The results agree to rounding (each work item is
one thread's whichever the count, but a thread's scratch buffer, and with it the vectorized
loops' split, depends on which thread runs it).
"""

from contextlib import contextmanager

import torch

# Multiply-adds of one Q·K (or P·V) product below which the work stays on one thread: about
# a millisecond of one core.
SINGLE_THREAD_MACS = 1 << 21


@contextmanager
def one_thread(macs: int):
    """Runs the block on one intra-op thread if macs (its work) is below SINGLE_THREAD_MACS."""
    threads = torch.get_num_threads()
    if threads == 1 or macs >= SINGLE_THREAD_MACS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
