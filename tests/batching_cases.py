"""Requests shared by the batching and asynchronous-scheduling tests."""

from ropeway import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts_of_mixed_lengths(tokenizer) -> list[list[int]]:
    """Six prompts from 5 to 250 tokens (one text, so greedy continuations are stable)."""
    base = ("In the beginning of the long report, the committee described the river, the valley, the old "
            "mill and the people who lived nearby, one family at a time, with great care. ")
    ids = tokenizer.encode(base * 8)
    return [ids[:5], ids[:37], ids[3:120], ids[10:260], ids[:16], ids[50:81]]
