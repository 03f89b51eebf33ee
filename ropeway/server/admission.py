"""The bound on queued work: past it, a request is turned away with 503 instead of waiting.

The engine runs at most max_num_seqs sequences at once; the gate lets max_waiting more be
in flight, waiting their turn. Sequences are counted (a request with n=4 is four), and are
counted from acceptance until the response ends, so the count is exact on the event loop
without reading the engine's queues from another thread.
"""

from .errors import APIError

RETRY_AFTER_SECONDS = 1


class AdmissionGate:
    def __init__(self, max_num_seqs: int, max_waiting: int):
        self.capacity = max_num_seqs + max_waiting
        self.in_flight = 0

    def admit(self, num_sequences: int, param: str = "n") -> "Ticket":
        if num_sequences > self.capacity:  # could never be admitted, even on an idle server
            raise APIError.bad_request(f"this request needs {num_sequences} sequences (n for each prompt); the server "
                                       f"holds at most {self.capacity} (--max-num-seqs + --max-waiting)", param)
        if self.in_flight + num_sequences > self.capacity:
            raise APIError(503, "the server is at capacity (its waiting queue is full); retry shortly",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_flight += num_sequences
        return Ticket(self, num_sequences)


class Ticket:
    """One admitted request's share of the gate, given back when the response ends; releasing
    again does nothing, so every path that may end a response can release."""

    def __init__(self, gate: AdmissionGate, num_sequences: int):
        self._gate = gate
        self._num_sequences = num_sequences

    def release(self) -> None:
        self._gate.in_flight -= self._num_sequences
        self._num_sequences = 0
