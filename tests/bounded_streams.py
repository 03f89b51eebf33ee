"""Helpers for the bounded-cache tests: long real text, and a stream run that checks every step."""

from ropeway import ContextParams, SamplingParams
from ropeway.scheduler import ContextPolicy


def long_text_ids(tokenizer, count: int) -> list[int]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    ids = tokenizer.encode(text)
    assert len(ids) >= count
    return ids[:count]


def stream_checking_positions(llm, policy: dict, prompt: list[int], after_step=None, rope_scaling=None):
    """Run one bounded-cache request to the end. Every step must place the new tokens at
    contiguous positions right after the cache and stay within the policy's largest cache.
    Returns the sequence and (tokens computed, blocks in use) before each step."""
    engine = llm.engine
    max_cache = ContextPolicy.from_dict(policy).max_cache_tokens(engine.config.block_size)
    engine.add_request("stream", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       ContextParams(context_policy=policy, rope_scaling=rope_scaling))
    seq = engine.requests["stream"].choices[0].seq
    upload = engine.runner.upload
    seen = []

    def checked_upload(host, previous_tokens=None):
        batch = upload(host, previous_tokens)
        cached = seq.num_cached_positions
        n = batch.input_ids.shape[0]
        assert batch.positions.tolist() == list(range(cached, cached + n))
        assert int(batch.seq_lens[0]) == cached + n <= max_cache
        seen.append((seq.num_computed_tokens, engine.block_manager.num_used_blocks))
        return batch

    engine.runner.upload = checked_upload  # every batch the runner builds reaches the device through it
    while engine.has_unfinished_requests():
        engine.step()
        if after_step is not None:
            after_step(seq)
    engine.runner.upload = upload
    return seq, seen


def run_wrapping_runner(engine, policy: dict, prompt: list[int], method: str, wrapper):
    """Run one bounded-cache request (greedy, one new token) to the end with the runner's
    `method` replaced by wrapper(original, argument), so a test can read the cache around
    each eviction or landmark write. Returns the sequence."""
    engine.add_request("wrapped", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                       ContextParams(context_policy=policy))
    seq = engine.requests["wrapped"].choices[0].seq
    original = getattr(engine.runner.cache_ops, method)
    setattr(engine.runner.cache_ops, method, lambda argument: wrapper(original, argument))
    while engine.has_unfinished_requests():
        engine.step()
    return seq
