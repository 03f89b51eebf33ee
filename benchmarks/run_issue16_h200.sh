#!/usr/bin/env bash
# Issue 16 on the H200 in one call (about 7 minutes; the stages' caps add up to 9¼): the sampler's GPU tests, then
#   1. decode step greedy vs temperature 0.8 + top_p 0.95 vs top_k 50 vs top-5 logprobs, B=1 and
#      B=64, 1k context, plus the sampler alone and its host share (benchmarks/sampling.py);
#   1b. the engine's host time per decode step in each of those settings, B=64, tiny random model
#      (benchmarks/host_overhead.py: the step minus its device work);
#   2. sink_window (4 sinks, window 2048) vs full cache, B=32, 4k prompts (benchmarks/bounded_decode.py);
#   3. serving random-256, greedy then chat traffic, one server (benchmarks/serving.py).
# JSON and logs go to $OUT (default benchmarks/results/issue16). Every stage runs even if one
# before it failed; the exit status is the number of failed stages.
#
# The GPU machine lacks the server's packages: fetch their wheels here first, and carry .whl:
#   ../shared/tools/device-wheels pyzmq msgspec
#   (on the device)  bash benchmarks/run_issue16_h200.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/issue16}
mkdir -p "$OUT"
if ! python3 -c "import fastapi, uvicorn, zmq, msgspec, gguf" 2>/dev/null; then
  [ -d .whl ] || { echo "missing server packages and no .whl: run ../shared/tools/device-wheels pyzmq msgspec"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $status after $((SECONDS - started)) s"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
if python3 -c "import pytest" 2>/dev/null; then
  stage gpu_tests 60 python3 -m pytest -q -x tests/test_kernels_gpu.py -k "sampler or filtered_draw or rerotate"
else
  echo "== gpu_tests: skipped (no pytest here)"
fi
stage sampling 150 python3 benchmarks/sampling.py --random-llama3-8b --out "$OUT/sampling_h200.json"
stage host_overhead 75 python3 benchmarks/host_overhead.py --batches 64 --settings greedy,top_p,top_k,logprobs \
  --async-scheduling --warm-steps 100 --steps 40 --out "$OUT/host_overhead_h200.json"
stage bounded_decode 90 python3 benchmarks/bounded_decode.py --random-llama3-8b --out "$OUT/bounded_decode_h200.json"
stage serving 180 python3 benchmarks/serving.py --random-llama3-8b --scenarios random-256 --sampling both \
  --out "$OUT/serving_random256.json" --server-log "$OUT/serving_server.log"
echo "failed stages: $failed"
exit "$failed"
