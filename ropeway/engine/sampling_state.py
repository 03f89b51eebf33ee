"""Per-sequence token counts on the device, for presence, frequency and repetition penalties.

A sequence that asks for a penalty gets a row when it first samples: its output-token counts
(int32) and which tokens its prompt holds (bool), built once from its token ids. Each step
adds the tokens it sampled on the device, so penalties never walk Python lists. A preempted
sequence keeps its row: recomputation rebuilds its cache but keeps its tokens, so the counts
stay right. The row is released when the sequence finishes or is aborted.
"""

import torch


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device, initial_rows: int = 8):
        self.vocab_size = vocab_size
        self.device = device
        self.output_counts = torch.zeros(initial_rows, vocab_size, dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros(initial_rows, vocab_size, dtype=torch.bool, device=device)
        self._rows: dict[int, int] = {}  # seq_id -> row
        self._free = list(range(initial_rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, seq_id: int, prompt_token_ids: list[int], output_token_ids: list[int]) -> int:
        """The sequence's row; a new one, built from its tokens, on its first call."""
        row = self._rows.get(seq_id)
        if row is not None:
            return row
        if not self._free:
            self._grow()
        row = self._rows[seq_id] = self._free.pop()
        self.prompt_seen[row] = False
        self.prompt_seen[row, _on_device(prompt_token_ids, self.device)] = True
        self.output_counts[row] = 0
        if output_token_ids:
            tokens = _on_device(output_token_ids, self.device)
            self.output_counts[row].index_put_((tokens,), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        return row

    def release(self, seq_id: int) -> None:
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self._free.append(row)

    def record(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Count the sampled tokens (device tensor [len(rows)]) of the rows that have a state row
        (-1: none), without reading them."""
        batch_rows = [i for i, row in enumerate(rows) if row >= 0]
        if not batch_rows:
            return
        if len(batch_rows) < len(rows):
            tokens = tokens.index_select(0, _on_device(batch_rows, self.device))
        index = _on_device([rows[i] for i in batch_rows], self.device)
        self.output_counts.index_put_((index, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[R, V] output counts and prompt presence for the given rows."""
        return self.output_counts[rows], self.prompt_seen[rows]

    def _grow(self) -> None:
        old = self.output_counts.shape[0]
        self.output_counts = torch.cat([self.output_counts, torch.zeros_like(self.output_counts)])
        self.prompt_seen = torch.cat([self.prompt_seen, torch.zeros_like(self.prompt_seen)])
        self._free.extend(range(2 * old - 1, old - 1, -1))


def _on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as an int64 device tensor, copied without waiting for the GPU's queue."""
    tensor = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
