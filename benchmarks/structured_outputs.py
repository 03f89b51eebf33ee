"""The decode step with structured outputs against without (issue 17), and a schema's first-use cost.

A batch of B requests with `--context`-token random prompts is prefilled, then `--steps` decode
steps are timed one by one (median), for three batches: none constrained; every request with a
JSON schema; 10% of them constrained. No request may finish before the timed steps end: none has
a max_tokens (each is aborted after them), the unconstrained ones ignore EOS, and the schema's
500 records (a record takes several tokens at any tokenizer) outlast the chunked prefill's steps,
in which the first-prefilled requests already decode, and the timed ones. The first-use cost of
a typical schema (a person record) is the edge's check plus the engine's matcher and first mask,
with nothing cached. Random weights: the constrained tokens follow the grammar, not sense. The
tokenizer is the random model's (bytes plus one word per id, with an EOS);
benchmarks/grammar_engines.py times masks over real vocabularies. Writes a table to stdout and JSON to `--out`.

GPU (the issue's shape, random weights):
    python benchmarks/structured_outputs.py --random-llama3-8b --out benchmarks/results/structured_outputs_h200.json
CPU smoke run (a tiny random model):
    python benchmarks/structured_outputs.py --tiny
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import llguidance.torch
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from random_model import LLAMA3_8B, build_engine, full_vocab_tokenizer, load_random_model  # noqa: E402
from sampling import TINY, synchronize  # noqa: E402

from ropeway import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from ropeway.engine.grammar import GrammarTokenizer, grammar_text  # noqa: E402
from ropeway.models import RopewayTokenizer  # noqa: E402
from ropeway.structured_outputs import StructuredOutputs  # noqa: E402

RECORDS = {"type": "array", "minItems": 500, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "status", "score"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                   "name": {"type": "string", "maxLength": 16},
                   "status": {"enum": ["active", "inactive", "pending"]},
                   "score": {"type": "number", "minimum": 0, "maximum": 1}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
          "properties": {"name": {"type": "string", "maxLength": 32}, "age": {"type": "integer", "minimum": 0},
                         "email": {"type": "string", "format": "email"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}}
BATCHES = {"unconstrained": 0.0, "all constrained": 1.0, "10% constrained": 0.1}


def tokenizer_with_eos(vocab_size: int) -> RopewayTokenizer:
    """The random model's tokenizer, its last id standing for EOS (a grammar needs one to end)."""
    words = full_vocab_tokenizer(vocab_size)
    return RopewayTokenizer(words.tokenizer, bos_token_id=None, eos_token_ids=[vocab_size - 1], add_bos=False,
                            chat_template=None)


def decode_step_ms(engine: LLMEngine, batch: int, constrained_share: float, context: int, steps: int) -> float:
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    num_constrained = round(batch * constrained_share)
    records = StructuredOutputs(json=json.dumps(RECORDS))
    for i in range(batch):
        prompt = torch.randint(0, vocab - 1, (context,), generator=generator).tolist()
        constrained = i < num_constrained
        # No max_tokens: requests prefilled in the first chunks decode while the others prefill, so a
        # bound sized to the timed steps would end them early.
        params = SamplingParams(max_tokens=None, seed=i, temperature=0.0, detokenize=False,
                                ignore_eos=not constrained, structured_outputs=records if constrained else None)
        engine.add_request(f"{constrained_share}-{i}", prompt, params)
    finished = []
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running) \
            or engine.scheduler.num_waiting:
        finished += [output for output in engine.step() if output.finished]
    for _ in range(3):  # warm-up decodes (and, with asynchronous scheduling, fill the pipeline)
        finished += [output for output in engine.step() if output.finished]
    times = []
    for _ in range(steps):
        synchronize(engine.device)
        started = time.perf_counter()
        outputs = engine.step()
        synchronize(engine.device)
        times.append((time.perf_counter() - started) * 1e3)
        finished += [output for output in outputs if output.finished]
    if finished:
        reasons = sorted({f"{output.request_id}: {output.outputs[0].finish_reason}" for output in finished})
        raise RuntimeError(f"{len(finished)} requests finished before the timed steps ended ({', '.join(reasons[:4])})")
    for i in range(batch):
        engine.abort_request(f"{constrained_share}-{i}")
    return statistics.median(times)


def first_use_ms(engine: LLMEngine, repeats: int = 5) -> dict:
    """A typical schema's cost on first use, each time from a fresh cache: the check at the edge
    (conversion and validation), then the matcher and its first mask."""
    core = engine.core
    started = time.perf_counter()
    fresh = GrammarTokenizer(core.grammar_tokenizer.tokenizer_json, core.grammar_tokenizer.vocab_size,
                             core.grammar_tokenizer.eos_token_ids)
    fresh.tokenizer  # noqa: B018 (built on first use: timed on its own)
    tokenizer_s = time.perf_counter() - started
    checks, firsts = [], []
    for repeat in range(repeats):
        grammar_text.cache_clear()
        schema = dict(PERSON, title=f"person {repeat}")  # a schema the engine has not seen
        params = SamplingParams(max_tokens=64, structured_outputs=StructuredOutputs(json=json.dumps(schema)))
        started = time.perf_counter()
        fresh.check(params)
        checks.append((time.perf_counter() - started) * 1e3)
        bitmask = llguidance.torch.allocate_token_bitmask(1, fresh.vocab_size)
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(fresh.matcher(params.structured_outputs), bitmask)
        firsts.append((time.perf_counter() - started) * 1e3)
    return {"tokenizer_build_s": round(tokenizer_s, 3), "check_ms": round(statistics.median(checks), 3),
            "matcher_and_first_mask_ms": round(statistics.median(firsts), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--random-llama3-8b", action="store_true")
    shape.add_argument("--tiny", action="store_true", help="a tiny random model on CPU (a smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="requests per batch (default 64; tiny: 8)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 1024; tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 50; tiny: 5)")
    parser.add_argument("--kv-gib", type=float, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batch = args.batch or (8 if args.tiny else 64)
    context = args.context or (32 if args.tiny else 1024)
    steps = args.steps or (5 if args.tiny else 50)
    if args.tiny:
        config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=batch, kv_cache_memory_bytes=64 * 2**20)
        engine = LLMEngine(config, loaded=load_random_model(TINY, torch.float32, torch.device("cpu"),
                                                            tokenizer_with_eos(TINY.vocab_size)))
    else:
        config = EngineConfig(dtype="bfloat16", max_num_seqs=batch, kv_cache_memory_bytes=int(args.kv_gib * 2**30))
        engine = build_engine(config, random_llama3_8b=True, tokenizer=tokenizer_with_eos(LLAMA3_8B.vocab_size))
        engine.capture_decode_graphs()
    results = {"device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
               "model": engine.model_config.name, "vocab": engine.model_config.vocab_size, "batch": batch,
               "context": context, "async_scheduling": engine.core.async_scheduling, "decode_step_ms": {}}
    for name, share in BATCHES.items():
        results["decode_step_ms"][name] = round(decode_step_ms(engine, batch, share, context, steps), 3)
    results["first_use"] = first_use_ms(engine)
    base = results["decode_step_ms"]["unconstrained"]
    print(f"| batch of {batch} | decode step ms | x unconstrained |")
    print("| --- | ---: | ---: |")
    for name, step in results["decode_step_ms"].items():
        print(f"| {name} | {step:.2f} | {step / base:.3f}x |")
    first = results["first_use"]
    print(f"\nfirst use of a typical schema: check {first['check_ms']:.2f} ms, matcher and first mask "
          f"{first['matcher_and_first_mask_ms']:.2f} ms (the tokenizer's one-time build: "
          f"{first['tokenizer_build_s']} s)")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
