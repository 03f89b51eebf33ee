"""The local stack as an operator runs it: deploy/local/stack starts `ropeway serve` and a real
Prometheus on 127.0.0.1; after traffic, Prometheus's HTTP API has ropeway's series, and every
metric the Grafana dashboard queries is on the live /metrics."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from deploy_tools import REPO, require_tool
from server_harness import free_port

pytestmark = pytest.mark.slow  # a server and Prometheus in subprocesses

DASHBOARD = REPO / "deploy" / "grafana" / "ropeway-dashboard.json"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_tool("prometheus", "apt-get install -y --no-install-recommends prometheus")
    require_tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    ropeway_port, prometheus_port = free_port(), free_port()
    env = {**os.environ, "ROPEWAY_PORT": str(ropeway_port), "PROMETHEUS_PORT": str(prometheus_port),
           "SCRAPE_INTERVAL": "1s", "STACK_DIR": str(tmp_path_factory.mktemp("stack")),
           "ROPEWAY": str(Path(sys.executable).parent / "ropeway"), "ROPEWAY_API_KEY": ""}
    process = subprocess.Popen([REPO / "deploy" / "local" / "stack", "--max-model-len", "512",
                                "--kv-cache-memory", "64MiB"], env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip() == "ready":
            break
    if process.poll() is not None:
        pytest.fail(f"the stack did not start:\n{''.join(lines)}\n" +
                    (Path(env["STACK_DIR"]) / "ropeway.log").read_text())
    yield process, f"http://127.0.0.1:{ropeway_port}", f"http://127.0.0.1:{prometheus_port}"
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def traffic(stack):
    """Completions, one long enough to be seen holding KV blocks across several scrapes."""
    _, ropeway, _ = stack
    with httpx.Client(base_url=ropeway, timeout=120) as http:
        for _ in range(2):  # the same prompt twice: a prefix-cache hit
            http.post("/v1/completions", json={"prompt": "The capital of France is " * 20, "max_tokens": 8,
                                               "temperature": 0}).raise_for_status()
        http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True,
                                           "temperature": 0}).raise_for_status()
    return stack


def query(prometheus: str, promql: str, **params) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql, **params}, timeout=10).json()
    assert answer["status"] == "success", (promql, answer)
    return answer["data"]["result"]


def eventually(predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def test_prometheus_scrapes_non_zero_token_counters_and_a_kv_usage_series(traffic):
    _, _, prometheus = traffic
    assert eventually(lambda: query(prometheus, 'up{job="ropeway"} == 1'))
    for counter in ("ropeway:prompt_tokens_total", "ropeway:generation_tokens_total"):
        assert eventually(lambda: query(prometheus, f"{counter} > 0")), f"{counter} is not above 0 in Prometheus"
    # 2 x 8 + 120 generated tokens, once a scrape after the last request has come in.
    assert eventually(lambda: query(prometheus, "ropeway:generation_tokens_total >= 136"))
    usage = query(prometheus, "ropeway:kv_cache_usage_perc[5m]")
    assert len(usage) == 1 and usage[0]["metric"]["model_name"] == "SmolLM2-135M-Instruct"
    assert len(usage[0]["values"]) >= 3
    assert query(prometheus, "max_over_time(ropeway:kv_cache_usage_perc[5m]) > 0")


def test_every_metric_the_dashboard_queries_is_on_the_live_metrics(traffic):
    _, ropeway, _ = traffic
    exposed = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{ropeway}/metrics").text.splitlines()
               if line and not line.startswith("#")}
    queried = {name for expr in dashboard_exprs() for name in re.findall(r"ropeway:[A-Za-z0-9_:]+", expr)}
    missing = sorted(queried - exposed)
    assert queried and not missing, f"the dashboard queries metrics that /metrics lacks: {missing}"


def test_every_dashboard_query_evaluates_in_prometheus(traffic):
    _, _, prometheus = traffic
    for expr in dashboard_exprs():
        # Grafana's variables as they are with "All" models selected and a 1 s scrape interval.
        query(prometheus, expr.replace("$model_name", ".*").replace("$__rate_interval", "1m"))


def test_sigterm_stops_both_and_exits_0(traffic):
    process, ropeway, prometheus = traffic
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    for url in (f"{ropeway}/health", f"{prometheus}/-/ready"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
