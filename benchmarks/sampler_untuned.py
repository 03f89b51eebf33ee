"""The sampler at B=256, vocab 128,256, in settings and logit shapes the other benchmarks do not use (CUDA).

  python3 benchmarks/sampler_untuned.py --check   # also compare tokens and top logprobs with the references
  PYTHONPATH=<an older tree> python3 benchmarks/sampler_untuned.py   # the same timings on another tree

Two logit shapes: flat (randn * 4, like the random-weight models) and a shuffled power law (a real model's
few likely tokens and long tail). Four settings: top_p 0.5 (half the rows unsettled), top_p + min_p,
top_k + top_p, and 20 logprobs. Prints the mean time of one eager sample() and its read, over 20 calls.
"""

import argparse
import time

import torch

from ropeway.engine.sampler import DrawColumns, SamplingBatch, SamplingRow, cuts_before_top_p_search, sample
from ropeway.engine.sampling_state import PenaltyState
from ropeway.kernels.sampling import filtered_draw_reference
from ropeway.sampling_params import SamplingParams

ROWS, VOCAB = 256, 128256
SETTINGS = {
    "top_p 0.5": {"temperature": 1.0, "top_p": 0.5},
    "top_p 0.95 + min_p 0.05": {"temperature": 0.7, "top_p": 0.95, "min_p": 0.05},
    "top_k 40 + top_p 0.9": {"temperature": 0.9, "top_k": 40, "top_p": 0.9},
    "t 1.2, logprobs 20": {"temperature": 1.2, "logprobs": 20},
}


def logit_shapes(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ranks = torch.arange(1, VOCAB + 1, device="cuda", dtype=torch.float32)
    power_law = -3.0 * ranks.log()
    shuffled = torch.stack([power_law[torch.randperm(VOCAB, generator=generator, device="cuda")]
                            for _ in range(ROWS)])
    return {"flat randn*4": torch.randn(ROWS, VOCAB, generator=generator, device="cuda") * 4,
            "zipf peaked": shuffled}


def against_references(logits: torch.Tensor, rows: list[SamplingRow], out) -> str:
    shape, columns = SamplingBatch(rows).plan(VOCAB)
    report = ""
    if shape.drawn:
        draw_columns = DrawColumns.uploaded(shape, columns, logits.device)
        scaled = logits / draw_columns.temperature
        row_max = scaled.amax(-1)
        cut, top_p, search = cuts_before_top_p_search(scaled, row_max, draw_columns)
        expected = filtered_draw_reference(scaled, cut, top_p, row_max, draw_columns.stream_keys, search)
        report += f"  tokens = reference: {expected.tolist() == out.token_ids}"
    if out.top_logprobs is not None:
        top = logits.log_softmax(-1).topk(20, dim=-1).values
        error = (torch.tensor(out.top_logprobs, device="cuda") - top).abs().max().item()
        report += f"  top logprobs max err {error:.1e}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    state = PenaltyState(VOCAB, torch.device("cuda"))
    for shape_name, logits in logit_shapes(torch.Generator(device="cuda").manual_seed(0)).items():
        for name, setting in SETTINGS.items():
            rows = [SamplingRow(SamplingParams(seed=i, **setting), seed=i, step=7) for i in range(ROWS)]
            for _ in range(3):
                sample(logits, rows, state).read()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(20):
                out = sample(logits, rows, state).read()
            line = f"{shape_name:13s} {name:26s} {(time.perf_counter() - started) / 20 * 1e6:8.0f} us"
            print(line + (against_references(logits, rows, out) if args.check else ""), flush=True)


if __name__ == "__main__":
    main()
