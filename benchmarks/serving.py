"""Online serving benchmark: concurrent streaming clients against a real `ropeway serve`.

  python benchmarks/serving.py --random-llama3-8b --transformers-baseline      # GPU, issue 8's run
  python benchmarks/serving.py --model path/to/model.gguf --scenarios short-8

Starts the server as a subprocess (benchmarks/serve_random_model.py for the random-weight
Llama-3-8B shape, else `ropeway serve --model ...`), then runs each scenario: N requests
with prompt and output lengths drawn from a seeded distribution, at most C in flight, each
a streamed /v1/completions call with token-id prompts and ignore_eos (so a request yields
exactly max_tokens tokens, counted from the stream's usage chunk). Reports output tok/s over
the scenario's wall time, p50/p99 time to first token and inter-token latency (between SSE
chunks, as vLLM's benchmark: a chunk that carries several tokens counts as one gap); prints
a table, writes JSON. The client is one Python process: at 256 streams on the H200 it spent
14.7 s of CPU in a 19.2 s run, yet was not the bottleneck (the same requests over 8 client
processes ran no faster: 7,117 tok/s against 7,565, BENCHMARKS.md, fifth session).
--transformers-baseline first measures transformers' generate on the same model
shape in this process (batch-1 ms per token, batch-32 tok/s), then frees it.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Scenario:
    name: str
    num_requests: int
    concurrency: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    extra_body: dict = field(default_factory=dict)


SCENARIOS = {
    "random-256": Scenario("random-256", 256, 256, (100, 1024), (100, 1024)),
    "random-64": Scenario("random-64", 64, 64, (100, 1024), (100, 1024)),
    "long-mix-8": Scenario("long-mix-8", 8, 8, (1024, 32768), (100, 256)),
    "short-8": Scenario("short-8", 16, 8, (32, 128), (16, 64)),
    # Long sessions in a bounded cache: 32k+ token streams through a 2k-token sink_window.
    "long-session-16": Scenario("long-session-16", 16, 16, (32768, 40960), (256, 512),
                                {"context_policy": {"type": "sink_window", "sinks": 4, "window": 2048}}),
}


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int
    chunks: int
    ttft: float
    itls: list[float]        # between consecutive chunks (a chunk may carry several tokens)
    error: str | None = None
    tokens: int = 0          # completion tokens, from the stream's final usage chunk


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sampling_fields(sampling: str, index: int) -> dict:
    """greedy: temperature 0. chat: what chat traffic sends (temperature 0.8, top_p 0.95, a seed per
    request), with every tenth request also asking for 5 top logprobs."""
    if sampling == "greedy":
        return {"temperature": 0}
    fields = {"temperature": 0.8, "top_p": 0.95, "seed": index}
    if index % 10 == 0:
        fields["logprobs"] = 5
    return fields


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                      extra: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    started = time.perf_counter()
    times = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(len(prompt), max_tokens, 0, float("nan"), [],
                                     f"{response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                # json.loads is ~2.5 us of the ~110 us of client CPU a chunk costs (httpx, h11 and
                # anyio take the rest): too little to trade for string matching on the JSON.
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return RequestResult(len(prompt), max_tokens, len(times), float("nan"), [], repr(error))
    if not times:
        return RequestResult(len(prompt), max_tokens, 0, float("nan"), [], "no tokens")
    return RequestResult(len(prompt), max_tokens, len(times), times[0] - started,
                         [b - a for a, b in zip(times, times[1:])], tokens=tokens)


def scenario_requests(scenario: Scenario, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) of each request, drawn from the scenario's seeded ranges."""
    rng = random.Random(seed)
    return [([rng.randrange(1000, vocab) for _ in range(rng.randint(*scenario.prompt_range))],
             rng.randint(*scenario.output_range)) for _ in range(scenario.num_requests)]


async def run_scenario(base_url: str, model: str, scenario: Scenario, vocab: int, seed: int,
                       sampling: str = "greedy") -> dict:
    requests = scenario_requests(scenario, vocab, seed)
    gate = asyncio.Semaphore(scenario.concurrency)
    limits = httpx.Limits(max_connections=scenario.concurrency, max_keepalive_connections=scenario.concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def bounded(index, prompt, max_tokens):
            extra = {**sampling_fields(sampling, index), **scenario.extra_body}
            async with gate:
                return await one_request(client, model, prompt, max_tokens, extra)

        started, cpu_started = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(bounded(i, p, n) for i, (p, n) in enumerate(requests)))
        wall, client_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    ok = [r for r in results if r.error is None]
    output_tokens = sum(r.tokens for r in ok)
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    return {
        "scenario": scenario.name, "sampling": sampling, "requests": scenario.num_requests,
        "concurrency": scenario.concurrency,
        "prompt_range": scenario.prompt_range, "output_range": scenario.output_range,
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:5],
        "tokens_match_max_tokens": all(r.tokens == r.output_len for r in ok),
        # The server joins tokens into one chunk for a reader that fell a step behind.
        "tokens_per_chunk": output_tokens / max(1, sum(r.chunks for r in ok)),
        # Near wall_s, the client itself (one Python process parsing every SSE chunk) is the bottleneck.
        "wall_s": wall, "client_cpu_s": client_cpu, "prompt_tokens": sum(r.prompt_len for r in ok),
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(itls, 50), "itl_p99_ms": 1000 * percentile(itls, 99),
    }


def transformers_baseline() -> dict:
    """transformers' generate on a Llama-3-8B-shaped model with random bf16 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    generator = torch.Generator().manual_seed(0)

    def timed_generate(batch: int, prompt_len: int, new_tokens: int) -> float:
        ids = torch.randint(1000, 128000, (batch, prompt_len), generator=generator).cuda()
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    with torch.inference_mode():
        timed_generate(1, 16, 4)
        one = timed_generate(1, 1024, 1)
        many = timed_generate(1, 1024, 33)
        batch32 = timed_generate(32, 512, 64)
    return {"batch1_ms_per_token_1k": 1000 * (many - one) / 32, "batch32_tok_s": 32 * 64 / batch32,
            "transformers": __import__("transformers").__version__}


def start_server(args, port: int) -> subprocess.Popen:
    if args.random_llama3_8b:
        command = [sys.executable, str(HERE / "serve_random_model.py")]
    else:
        command = [sys.executable, "-m", "ropeway.server.cli", "serve", "--model", args.model]
    command += ["--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
                "--max-waiting", str(args.max_waiting), "--no-enable-prefix-caching",
                "--log-level", "warning", *args.server_args]
    log = open(args.server_log, "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


def process_tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the process `pid` and each of its descendants, by
    command name (Linux /proc; empty elsewhere): which of the server's processes (API server, engine
    core, workers) runs out of CPU first."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds: dict[str, float] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        key = f"{name}[{current}]"
        seconds[key] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return seconds


def wait_ready(base_url: str, server: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}; see its log")
        try:
            response = httpx.get(base_url + "/v1/models", timeout=2)
            if response.status_code == 200:
                return response.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("server did not come up in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory for `ropeway serve`")
    parser.add_argument("--random-llama3-8b", action="store_true", help="serve the random-weight Llama-3-8B shape")
    parser.add_argument("--scenarios", default="random-256,random-64,long-mix-8",
                        help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    parser.add_argument("--sampling", default="greedy",
                        help="greedy, chat (temperature 0.8, top_p 0.95, a seed per request, every tenth request "
                             "with 5 top logprobs), or both: each scenario runs once per mode, in the same server")
    parser.add_argument("--transformers-baseline", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-waiting", type=int, default=1024)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=128000, help="prompt token ids are drawn below this")
    parser.add_argument("--server-log", default="results/serving_server.log")
    parser.add_argument("--out", default="results/serving.json")
    parser.add_argument("server_args", nargs="*", help="after --: more `ropeway serve` flags")
    args = parser.parse_args()
    if not (args.model or args.random_llama3_8b):
        parser.error("give --model or --random-llama3-8b")
    Path(args.server_log).parent.mkdir(parents=True, exist_ok=True)

    report = {"command": " ".join(sys.argv), "scenarios": []}
    if args.transformers_baseline:
        report["transformers"] = transformers_baseline()
        __import__("torch").cuda.empty_cache()  # the baseline model is gone once it returns
        print("transformers generate:", report["transformers"], flush=True)

    base_url = f"http://127.0.0.1:{args.port}"
    server = start_server(args, args.port)
    try:
        model = wait_ready(base_url, server, timeout=600)
        # Warm-up: compiles kernels and captures the decode graphs the scenarios will use.
        asyncio.run(run_scenario(base_url, model, Scenario("warm-up", args.max_num_seqs, args.max_num_seqs,
                                                            (16, 64), (4, 8)), args.vocab, args.seed + 1))
        modes = ["greedy", "chat"] if args.sampling == "both" else [args.sampling]
        for name in args.scenarios.split(","):
            for mode in modes:
                cpu_before = process_tree_cpu(server.pid)
                result = asyncio.run(run_scenario(base_url, model, SCENARIOS[name], args.vocab, args.seed, mode))
                cpu_after = process_tree_cpu(server.pid)
                # Near wall_s for a process: that process is the bottleneck.
                result["server_cpu_s"] = {key: round(cpu_after[key] - cpu_before.get(key, 0.0), 2)
                                          for key in cpu_after}
                report["scenarios"].append(result)
                print(json.dumps(result), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    print(f"\n{'scenario':<16} {'sampling':<8} {'reqs':>5} {'conc':>5} {'out tok/s':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'failed':>6}")
    for r in report["scenarios"]:
        print(f"{r['scenario']:<16} {r['sampling']:<8} {r['requests']:>5} {r['concurrency']:>5} "
              f"{r['output_tok_s']:>10.0f} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} "
              f"{r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>8.2f} {r['failed']:>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
