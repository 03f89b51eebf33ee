"""A needle check in a setting needle.py's grid never uses: vim's user manual
(/usr/share/vim/vim90/doc/usr_0*.txt) as the filler, four needles and questions not in needle.py,
10,240-token prompts, window 1536, retrieve 192, depths 20% and 60%; retrieval (the engine's
default rule) against the oracle, with needle-block recall.

  PYTHONPATH=. python benchmarks/needle_unseen.py [OUT.json]   # CPU, fp32: about 6 minutes
"""

import glob
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import needle  # noqa: E402

from ropeway import LLM, ContextParams, SamplingParams  # noqa: E402

# (needle, answer, question ending with the answer's first words)
NEEDLES = [
    (" The harbour master moved the weekly meeting to room 312 on the third floor. ", "312",
     " Which room is the harbour master's weekly meeting in now? The meeting is in room"),
    (" Dr. Amara Okonkwo signed the final inspection report for the tunnel. ", "Okonkwo",
     " Earlier in this manual there was an unrelated remark about an inspection report for a tunnel and who"
     " signed it. I need that person's surname for my records. Who signed the final inspection report? It was"
     " signed by Dr. Amara"),
    (" The backup generator runs on a blend of diesel and rapeseed oil. ", "rapeseed",
     " What does the backup generator run on? It runs on a blend of diesel and"),
    (" The orchard at the end of Mill Lane was planted in the autumn of 1953. ", "1953",
     " When was the orchard at the end of Mill Lane planted? The orchard at the end of Mill Lane was planted in"
     " the autumn of"),
]
LENGTH, WINDOW, RETRIEVE, DEPTHS = 10240, 1536, 192, (0.2, 0.6)


def main() -> None:
    llm = LLM(dtype="float32", max_model_len=LENGTH + 64, kv_cache_memory_bytes=2 << 30, max_num_seqs=8,
              max_num_batched_tokens=1024, prefill_chunk_size=512, retrieval_archive_bytes=12 << 30)
    encode = llm.tokenizer.encode
    text = "".join(Path(p).read_text(errors="ignore") for p in sorted(glob.glob("/usr/share/vim/vim90/doc/usr_0*.txt")))
    filler = encode(text)
    cases = []  # (label, answer, (prompt, needle token range, oracle prompt))
    for depth in DEPTHS:
        for n, (needle_text, answer, question) in enumerate(NEEDLES):
            made = needle.make_prompt(filler, encode(needle_text), encode(question), LENGTH, WINDOW, depth, RETRIEVE,
                                      random.Random(f"vim/{depth}/{n}"))
            cases.append((f"{depth}/{answer}", answer, made))
    params = SamplingParams(temperature=0, max_tokens=12)
    policy = needle.policies(WINDOW, RETRIEVE)["retrieve"]
    with needle.recording_recalls(llm) as recalled:
        outputs = llm.generate([made[0] for _, _, made in cases], params, context=ContextParams(context_policy=policy))
    oracle = llm.generate([made[2] for _, _, made in cases], params)
    rows = []
    block = llm.engine.config.block_size
    for (label, answer, made), out, oracle_out in zip(cases, outputs, oracle):
        rows.append({"case": label, "retrieve": answer in out.outputs[0].text,
                     "oracle": answer in oracle_out.outputs[0].text,
                     "needle_block_share": needle.needle_block_share(made[1], recalled.get(out.request_id, []), block),
                     "text": out.outputs[0].text})
        print(rows[-1], flush=True)
    count = len(rows)
    print(f"retrieve {sum(r['retrieve'] for r in rows)}/{count}, oracle {sum(r['oracle'] for r in rows)}/{count},"
          f" recall {sum(r['needle_block_share'] for r in rows) / count:.3f}")
    Path(sys.argv[1] if len(sys.argv) > 1 else "needle_unseen.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
