"""Counts the torch ops (aten dispatches) and Triton launches the host makes, by name.

On CUDA each costs the host ~5-30 us (dispatch, allocation, launch) whatever the tensor's
size, so their number per step is a measure of host time that holds on any machine, a
loaded CPU box included. Work inside `paused()` (the model's forward, which CUDA replays as
one graph; a Triton launch's own internals) is not counted.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) the launches the CUDA path
would make are counted the same way as on a GPU.
"""

import collections
import contextlib
import functools

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launches: collections.Counter[str] = collections.Counter()
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def pausing(self, call):
        """call, with its own ops uncounted."""
        @functools.wraps(call)
        def uncounted(*args, **kwargs):
            with self.paused():
                return call(*args, **kwargs)
        return uncounted

    @contextlib.contextmanager
    def counting_triton_launches(self):
        """Count every Triton kernel launch (compiled or interpreted) while inside."""
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
        counter = self

        def counted(run):
            def run_counted(kernel, *args, **kwargs):
                if not counter._paused:
                    counter.launches[kernel.__name__ if hasattr(kernel, "__name__") else str(kernel)] += 1
                with counter.paused():
                    return run(kernel, *args, **kwargs)
            return run_counted

        for cls, run in originals.items():
            cls.run = counted(run)
        try:
            yield self
        finally:
            for cls, run in originals.items():
                cls.run = run

    def reset(self) -> None:
        self.ops.clear()
        self.launches.clear()
