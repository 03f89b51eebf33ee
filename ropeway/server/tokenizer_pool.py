"""Tokenization and chat templating off the event loop.

The tokenizers library holds the GIL while it encodes (a 10 MB prompt took 25 s on this
machine's core, and a thread beside it got no time at all), so a thread pool would not free the
event loop: long texts go to worker processes, each with its own copy of the tokenizer, rebuilt
from the engine's TokenizerSpec. Short texts, almost every request, are encoded inline, where a
process round trip would cost more than the encoding. Token ids come back as an int64 array:
unpickling a list of millions of ints would itself hold the event loop for longer than that.
"""

import array
import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from ropeway.engine import tokenizer_from_info
from ropeway.engine.messages import EngineInfo
from ropeway.models.tokenizer import RopewayTokenizer

INLINE_CHARS = 32_768  # encoded inline below this: well under a millisecond
WORKERS = 2

_worker_tokenizer: RopewayTokenizer | None = None


def _start_worker(info: EngineInfo) -> None:
    global _worker_tokenizer
    # Behind the event loop and the engine for CPU: a long prompt may wait, /health must not.
    os.nice(10)
    _worker_tokenizer = tokenizer_from_info(info)


def _encode(text: str, add_special_tokens: bool) -> array.array:
    return array.array("q", _worker_tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _encode_chat(messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> array.array:
    return array.array("q", _worker_tokenizer.encode_chat(messages, add_generation_prompt, tools))


class TokenizerPool:
    def __init__(self, tokenizer: RopewayTokenizer, info: EngineInfo, workers: int = WORKERS):
        self.tokenizer = tokenizer
        self._info = info
        self._workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        # Started on the first long text: a server that never sees one never pays for the processes.
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(self._info,))
        return self._executor

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int] | array.array:
        if len(text) < INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.get_running_loop().run_in_executor(self._pool(), _encode, text, add_special_tokens)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> list[int] | array.array:
        """Raises what the template raises (jinja2.TemplateError, or ValueError without a template)."""
        if sum(len(message.get("content") or "") for message in messages) < INLINE_CHARS:
            return self.tokenizer.encode_chat(messages, add_generation_prompt, tools)
        return await asyncio.get_running_loop().run_in_executor(self._pool(), _encode_chat, messages,
                                                                add_generation_prompt, tools)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
