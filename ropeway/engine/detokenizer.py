"""Incremental detokenization with stop strings.

Text is decoded over a short window of recent tokens, and new text is released only once
it no longer ends in a partial UTF-8 character. Up to (longest stop string − 1) characters
are held back until it is clear they do not start a stop string, so a stop string never
leaks to a client, not even in part.
"""

from ropeway.models.tokenizer import RopewayTokenizer

_PROMPT_CONTEXT_TOKENS = 5  # prompt tail decoded along, so the first output token gets its spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer: RopewayTokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""          # all output text so far (after any stop-string cut)
        self.released = 0       # characters of self.text handed out
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> None:
        """Add one output token; sets stop_reason if a stop string completed."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # a partial UTF-8 sequence: wait for the bytes that complete it
        new_text = after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new_text
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1 and (self.stop_reason is None or at < self._stop_at):
                self.stop_reason, self._stop_at = stop, at
        if self.stop_reason is not None:
            cut = self._stop_at + (len(self.stop_reason) if self.include_stop else 0)
            self.text = self.text[:cut]

    def release(self, finished: bool) -> str:
        """Text that is safe to hand out now; everything that is left once finished."""
        end = len(self.text) if finished or self.stop_reason is not None else max(
            self.released, len(self.text) - self.holdback)
        delta = self.text[self.released : end]
        self.released = end
        return delta
