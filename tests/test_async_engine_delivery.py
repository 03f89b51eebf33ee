"""How outputs reach stream readers (the real engine core, driven step by step)."""

import asyncio

from ropeway import EngineConfig, LLMEngine, SamplingParams
from ropeway.engine import AsyncLLM, LoadedModel
from ropeway.engine.messages import EngineOutputs


def test_a_reader_that_fell_behind_gets_the_queued_tokens_as_one_output(default_llm):
    loaded = LoadedModel(default_llm.engine.model, default_llm.tokenizer, 0.0)
    engine = LLMEngine(EngineConfig(dtype="float32"), loaded=loaded)
    front = AsyncLLM.in_thread(engine)  # the core's thread is not started: this test steps the core itself
    sent = []
    front._started = True
    front.core.is_alive = lambda: True
    front.core.send = sent.append
    prompt = default_llm.tokenizer.encode("The river ran past the old mill and")
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = default_llm.generate([prompt], params)[0].outputs[0]

    async def read():
        stream = front.generate(prompt, params, "behind")
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the reader has posted its request and waits for output
        engine.core.add_request(sent.pop())
        for _ in range(3):  # three steps' outputs queue up before the reader runs again
            front._on_outputs(EngineOutputs(deltas=engine.core.step()))
        output = await first
        rest = [item async for item in stream]
        return output, rest

    output, rest = asyncio.run(read())
    choice = output.outputs[0]
    assert output.finished and rest == []
    assert choice.delta_token_ids == expected.token_ids == choice.token_ids
    assert choice.delta_text == expected.text
    assert not engine.has_unfinished_requests()
