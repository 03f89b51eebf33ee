"""xgrammar against llguidance on ropeway's JSON schema suite (issue 17): which grammar engine to build on.

For each engine and tokenizer: the compile time of every schema in tests/data/json_schemas.json
(first use, nothing cached), how many it compiles (coverage), and the time to fill one row's
token bitmask per decode step, over a seeded walk through each schema's grammar (each step
draws a random allowed token). Two tokenizers: the default model's (SmolLM2, 49,152 tokens)
and a 128,256-token byte-level BPE of the Llama-3 shape (the SmolLM2 vocabulary plus merges of
random token pairs: no model hub is reachable here, so not Llama-3's own vocabulary).

    python benchmarks/grammar_engines.py --out benchmarks/results/grammar_engines_cpu.json

xgrammar is needed for this comparison only: `pip install xgrammar` (ropeway runs on llguidance).
"""

import argparse
import importlib.metadata
import json
import pathlib
import random
import statistics
import sys
import time

import llguidance
import llguidance.torch
import torch
import xgrammar
from tokenizers import Tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ropeway.models.gguf_loader import gguf_metadata, read_gguf  # noqa: E402
from ropeway.models.default_model import default_model_path  # noqa: E402
from ropeway.models.tokenizer import tokenizer_from_gguf  # noqa: E402

SCHEMAS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "json_schemas.json"
LLAMA3_VOCAB = 128256


def default_tokenizer() -> tuple[str, int]:
    tokenizer = tokenizer_from_gguf(gguf_metadata(read_gguf(default_model_path())))
    return tokenizer.tokenizer.to_str(), tokenizer.eos_token_ids[0]


def widened(tokenizer_json: str, vocab_size: int, seed: int = 0) -> str:
    """The tokenizer with merges of random token pairs appended until it has vocab_size tokens."""
    spec = json.loads(tokenizer_json)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    pieces = [piece for piece in vocab if len(piece) <= 6]
    rng = random.Random(seed)
    next_id = len(vocab) + len(spec.get("added_tokens", []))
    while next_id < vocab_size:
        left, right = rng.choice(pieces), rng.choice(pieces)
        if left + right in vocab:
            continue
        vocab[left + right] = next_id
        merges.append([left, right] if isinstance(merges[0], list) else f"{left} {right}")
        next_id += 1
    for added in spec.get("added_tokens", []):  # special tokens keep ids below the merges
        vocab.setdefault(added["content"], added["id"])
    return json.dumps(spec)


class XGrammar:
    name = "xgrammar " + importlib.metadata.version("xgrammar")

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: int):
        tokenizer = Tokenizer.from_str(tokenizer_json)
        vocab = [tokenizer.id_to_token(i) or "" for i in range(vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def walk(self, compiled, rng: random.Random, steps: int) -> list[float]:
        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - started)
            token = random_allowed(bitmask[0], self.vocab_size, rng)
            if not matcher.accept_token(token) or matcher.is_terminated():
                break
        return times


class LLGuidance:
    name = "llguidance " + importlib.metadata.version("llguidance")

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: int):
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def walk(self, grammar, rng: random.Random, steps: int) -> list[float]:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - started)
            token = random_allowed(bitmask[0], self.vocab_size, rng)
            if not matcher.consume_token(token) or matcher.is_stopped():
                break
        return times


def random_allowed(bitmask_row: torch.Tensor, vocab_size: int, rng: random.Random) -> int:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.flatten()[:vocab_size].nonzero().flatten().tolist()
    return rng.choice(allowed)


def measure(engine, schemas: list[dict], steps: int) -> dict:
    compile_ms, step_us, failures = [], [], []
    for index, schema in enumerate(schemas):
        text = json.dumps(schema)
        started = time.perf_counter()
        try:
            compiled = engine.compile(text)
        except Exception as error:  # noqa: BLE001 (coverage: count what the engine refuses)
            failures.append(f"{schema.get('title')}: {str(error)[:120]}")
            continue
        compile_ms.append((time.perf_counter() - started) * 1e3)
        try:
            step_us += [t * 1e6 for t in engine.walk(compiled, random.Random(index), steps)]
        except Exception as error:  # noqa: BLE001
            failures.append(f"{schema.get('title')} (walk): {str(error)[:120]}")
    return {
        "compiled": len(compile_ms), "schemas": len(schemas), "failures": failures,
        "compile_ms_median": statistics.median(compile_ms), "compile_ms_max": max(compile_ms),
        "compile_ms_total": sum(compile_ms),
        "mask_us_median": statistics.median(step_us), "mask_us_p99": sorted(step_us)[int(0.99 * len(step_us))],
        "mask_steps": len(step_us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=48, help="decode steps walked per schema")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    schemas = json.loads(SCHEMAS.read_text())
    base_json, eos = default_tokenizer()
    tokenizers = {"SmolLM2 (49,152)": (base_json, 49152), "Llama-3 shape (128,256)": (widened(base_json, LLAMA3_VOCAB),
                                                                                     LLAMA3_VOCAB)}
    results = []
    print(f"{'engine':<20} {'tokenizer':<24} {'compiled':>9} {'compile ms (median/max)':>24} "
          f"{'mask us (median/p99)':>22} {'tokenizer setup s':>18}")
    for tokenizer_name, (tokenizer_json, vocab_size) in tokenizers.items():
        for engine_class in (XGrammar, LLGuidance):
            started = time.perf_counter()
            engine = engine_class(tokenizer_json, vocab_size, eos)
            setup = time.perf_counter() - started
            row = {"engine": engine.name, "tokenizer": tokenizer_name, "tokenizer_setup_s": setup,
                   **measure(engine, schemas, args.steps)}
            results.append(row)
            print(f"{row['engine']:<20} {tokenizer_name:<24} {row['compiled']:>4}/{row['schemas']:<4} "
                  f"{row['compile_ms_median']:>11.2f} / {row['compile_ms_max']:<10.2f} "
                  f"{row['mask_us_median']:>9.1f} / {row['mask_us_p99']:<10.1f} {setup:>18.2f}")
            for failure in row["failures"]:
                print("   not compiled:", failure)
    if args.out:
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
