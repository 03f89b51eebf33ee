"""/health latency while large prompts are being refused (issue 23's target: p99 under 100 ms).

  python benchmarks/health_under_large_prompts.py --prompt-mib 10 --seconds 60

Starts `ropeway serve` (extra flags after --server-args), then keeps --senders clients posting
completions whose prompt is --prompt-mib MiB of text (longer than any context, so each is
tokenized, off the event loop, and refused with a 400), while one client asks /health every
--interval seconds. Prints and writes (JSON) the /health latency percentiles and the large
requests' statuses.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from soak import wait_healthy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-mib", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--warm-up", action="store_true", help="start the tokenizer processes before measuring")
    parser.add_argument("--port", type=int, default=8172)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/health_under_large_prompts.json"))
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    base_url = f"http://127.0.0.1:{args.port}"
    log_path = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "ropeway.server.cli", "serve", "--port", str(args.port),
                               "--log-level", "warning", *args.server_args],
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                              env={**os.environ, "ROPEWAY_API_KEY": ""})
    statuses: list[int] = []
    latencies: list[float] = []
    sent_at: list[float] = []  # seconds since the senders started
    try:
        wait_healthy(base_url, server, log_path)
        body = json.dumps({"prompt": "The quick brown fox jumps over the lazy dog. " * int(
            args.prompt_mib * 2**20 / 45), "max_tokens": 4}).encode()
        if args.warm_up:  # one long prompt first: the tokenizer processes start on the first one
            httpx.post(base_url + "/tokenize", json={"prompt": "warm up " * 8192}, timeout=600)
        deadline = time.monotonic() + args.seconds

        def send() -> None:
            with httpx.Client(base_url=base_url, timeout=600) as client:
                while time.monotonic() < deadline:
                    statuses.append(client.post("/v1/completions", content=body,
                                                headers={"content-type": "application/json"}).status_code)

        senders = [threading.Thread(target=send) for _ in range(args.senders)]
        for sender in senders:
            sender.start()
        with httpx.Client(base_url=base_url, timeout=60) as health:
            first = time.perf_counter()
            while time.monotonic() < deadline:
                started = time.perf_counter()
                assert health.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                sent_at.append(started - first)
                time.sleep(args.interval)
        for sender in senders:
            sender.join()
    finally:
        server.terminate()
        server.wait(60)
    quantiles = statistics.quantiles(latencies, n=100)
    result = {"prompt_mib": args.prompt_mib, "senders": args.senders, "seconds": args.seconds,
              "server_args": args.server_args, "health_requests": len(latencies),
              "health_p50_ms": round(quantiles[49] * 1000, 2), "health_p99_ms": round(quantiles[98] * 1000, 2),
              "health_max_ms": round(max(latencies) * 1000, 2),
              "slowest_at_seconds": [round(sent_at[i], 1) for i in sorted(range(len(latencies)),
                                                                          key=latencies.__getitem__)[-5:]],
              "large_request_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
