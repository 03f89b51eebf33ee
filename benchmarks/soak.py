"""Soak: mixed traffic against a real `ropeway serve` for --minutes, watching for leaks and errors.

  python benchmarks/soak.py                          # 30 minutes, the default model, CPU or GPU
  python benchmarks/soak.py --minutes 5 --concurrency 4 --out benchmarks/results/soak_cpu.json

Starts `ropeway serve` as a subprocess (its extra flags after --server-args), then runs
--concurrency clients in a loop, each picking one operation at a time: a whole completion, a
streamed chat, a stream dropped after its first tokens (a client that goes away), n=2 choices,
a bad request (which must get a 4xx), /tokenize, /health. Every --sample-seconds it records the
server's RSS (API process and engine core together), open file descriptors of both, KV blocks in
use (/metrics) and the errors so far: any 5xx, any unexpected status, any transport failure.
At the end the KV cache must be empty again. Writes JSON and a plot beside it (.png), and prints
RSS growth after warm-up (the first --warmup-minutes): the target is under 2%, with 0 errors.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["Tell me about the sea.", "Write a haiku about autumn.", "What is 17 times 23?",
           "List three uses of copper.", "Explain photosynthesis to a child.", "Describe a busy market."]
BAD_REQUESTS = [
    {"prompt": "x", "top_k": 2**63}, {"prompt": "x", "max_tokens": "5"}, {"prompt": []},
    {"prompt": "x", "rope_scaling": {"rope_type": "ntk", "factor": 1e35}}, {"prompt": [True]},
    {"messages": []}, {"prompt": "x", "stop": ["s"] * 17},
]


@dataclass
class Sample:
    minute: float
    rss_mib: float
    open_files: int
    kv_used_blocks: float
    operations: int
    errors: int


@dataclass
class Tally:
    operations: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def done(self, kind: str) -> None:
        self.operations[kind] = self.operations.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.operations.values())


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the engine-core process, tokenizer workers)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            queue.extend(int(child) for child in children)
    return pids


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def open_files(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def kv_used_blocks(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("ropeway:kv_cache_used_blocks"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("no ropeway:kv_cache_used_blocks in /metrics")


async def one_operation(client: httpx.AsyncClient, rng: random.Random, tally: Tally, max_tokens: int) -> None:
    kind = rng.choice(["complete", "stream_chat", "drop_stream", "choices", "bad", "tokenize", "health"])
    prompt = rng.choice(PROMPTS)
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    try:
        if kind == "complete":
            response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
            expect(response, 200, kind, tally)
        elif kind == "choices":
            response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                                   "n": 2, "temperature": 0.8})
            expect(response, 200, kind, tally)
        elif kind in ("stream_chat", "drop_stream"):
            async with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
                expect(response, 200, kind, tally)
                frames = 0
                async for line in response.aiter_lines():
                    frames += line.startswith("data: ")
                    if kind == "drop_stream" and frames >= 2:
                        break  # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        break
                    if '"error"' in line:
                        tally.errors.append(f"{kind}: error frame {line[:200]}")
        elif kind == "bad":
            body = rng.choice(BAD_REQUESTS)
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            expect(await client.post(path, json=body), 400, kind, tally)
        elif kind == "tokenize":
            expect(await client.post("/tokenize", json={"prompt": prompt}), 200, kind, tally)
        else:
            expect(await client.get("/health"), 200, kind, tally)
    except httpx.HTTPError as error:
        tally.errors.append(f"{kind}: {error!r}")
    tally.done(kind)


def expect(response: httpx.Response, status: int, kind: str, tally: Tally) -> None:
    if response.status_code != status:
        tally.errors.append(f"{kind}: status {response.status_code}, expected {status}")


async def client_loop(base_url: str, seed: int, deadline: float, tally: Tally, max_tokens: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        while time.monotonic() < deadline:
            await one_operation(client, rng, tally, max_tokens)


async def soak(args, base_url: str, server_pid: int) -> tuple[list[Sample], Tally, float]:
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    clients = [asyncio.create_task(client_loop(base_url, seed, deadline, tally, args.max_tokens))
               for seed in range(args.concurrency)]
    samples = []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        running = set(clients)
        while running:  # a sample every sample_seconds, and one when the last client is done
            _, running = await asyncio.wait(running, timeout=args.sample_seconds)
            pids = process_tree(server_pid)
            samples.append(Sample(round((time.monotonic() - started) / 60, 2), round(rss_mib(pids), 1),
                                  open_files(pids), kv_used_blocks(http), tally.total, len(tally.errors)))
            print(f"{samples[-1].minute:6.2f} min  RSS {samples[-1].rss_mib:8.1f} MiB  fds {samples[-1].open_files:4d}"
                  f"  KV blocks {samples[-1].kv_used_blocks:6.0f}  ops {tally.total:6d}  errors {len(tally.errors)}",
                  flush=True)
        await asyncio.gather(*clients)  # raises what a client raised
        await asyncio.sleep(2)  # the last aborts reach the engine
        kv_after = kv_used_blocks(http)
    return samples, tally, kv_after


def plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.minute for s in samples]
    figure, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for axis, values, label in zip(axes, [[s.rss_mib for s in samples], [s.open_files for s in samples],
                                          [s.kv_used_blocks for s in samples], [s.errors for s in samples]],
                                   ["RSS (MiB)", "open files", "KV blocks in use", "errors"]):
        axis.plot(minutes, values, marker=".")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="RSS growth is measured from here (default: a tenth of the run, at least one sample)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--sample-seconds", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=8171)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to `ropeway serve` (e.g. --model X --max-model-len 4096)")
    args = parser.parse_args()
    base_url = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, "-m", "ropeway.server.cli", "serve", "--port", str(args.port), "--log-level",
               "warning", *args.server_args]
    log_path = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                              env={**os.environ, "ROPEWAY_API_KEY": ""})
    try:
        wait_healthy(base_url, server, log_path)
        samples, tally, kv_after = asyncio.run(soak(args, base_url, server.pid))
    finally:
        server.terminate()
        server.wait(60)
    warmup = args.warmup_minutes if args.warmup_minutes is not None else args.minutes / 10
    after_warmup = [s for s in samples if s.minute >= warmup] or samples[-1:]
    growth = (samples[-1].rss_mib - after_warmup[0].rss_mib) / after_warmup[0].rss_mib
    result = {"minutes": args.minutes, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "server_args": args.server_args, "operations": tally.operations, "errors": tally.errors,
              "rss_growth_after_warmup": round(growth, 4), "warmup_minutes": warmup,
              "kv_used_blocks_at_end": kv_after, "samples": [asdict(s) for s in samples]}
    args.out.write_text(json.dumps(result, indent=1))
    plot(samples, args.out.with_suffix(".png"), f"soak: {args.minutes:g} min, {args.concurrency} clients, "
                                                f"{tally.total} operations, {len(tally.errors)} errors")
    print(f"{tally.total} operations {tally.operations}; errors: {len(tally.errors)}; RSS growth after "
          f"{warmup:g} min warm-up: {growth:+.2%}; KV blocks in use at the end: {kv_after:g}; wrote {args.out}")
    for error in tally.errors[:20]:
        print("  ", error)


def wait_healthy(base_url: str, server: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {log_path}")
        time.sleep(1)


if __name__ == "__main__":
    main()
