"""`ropeway serve` on a Llama-3-8B-shaped model with random bf16 weights (benchmarks only).

  python benchmarks/serve_random_model.py [any ropeway serve flags except --model]

The weights are built in memory (nothing to download); the tokenizer gives every id a
plain-text word, so streams carry one chunk per token. This swaps the engine constructor
that `ropeway serve` calls and is otherwise the real server. With ROPEWAY_STEP_TRACE=path,
every engine step is timed and classified (step_trace.py) and written there at exit.
"""

import atexit
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import LLAMA3_8B, build_engine, full_vocab_tokenizer  # noqa: E402
from step_trace import StepTrace  # noqa: E402

import ropeway.engine  # noqa: E402
from ropeway.server import cli  # noqa: E402


def engine_on_random_weights(config):
    engine = build_engine(config, True, full_vocab_tokenizer(LLAMA3_8B.vocab_size))
    trace_path = os.environ.get("ROPEWAY_STEP_TRACE")
    if trace_path:
        trace = StepTrace(engine)
        atexit.register(lambda: Path(trace_path).write_text(
            json.dumps({"steps_by_kind": trace.summary(), "steps": trace.records})))
    return engine


if __name__ == "__main__":
    if os.environ.get("ROPEWAY_SWITCH_INTERVAL"):  # experiments with the GIL's hand-over interval
        cli.SWITCH_INTERVAL_SECONDS = float(os.environ["ROPEWAY_SWITCH_INTERVAL"])
    # serve() imports the engine when it starts (so --help stays fast): replace it where it is found.
    ropeway.engine.LLMEngine = engine_on_random_weights
    sys.exit(cli.main(["serve", *sys.argv[1:], "--served-model-name", LLAMA3_8B.name]))
