"""gsm8k_cot_dllm: lm-eval's gsm8k_cot prompt, exemplars, filters and exact_match options, on local GSM8K files,
through a scripted model whose right and wrong answers are known."""

from __future__ import annotations

import pytest
from scripted_lm import evaluate
from tasks_support import GSM8K_MINI, load_tasks, load_utils


@pytest.fixture(scope="module")
def task():
    return load_tasks(["gsm8k_cot_dllm"], gsm8k_path=GSM8K_MINI)["gsm8k_cot_dllm"]


def test_filters_metric_and_exemplars_are_lm_evals(task):
    theirs = load_utils("gsm8k").lm_eval_gsm8k_cot_config()
    assert task.config.filter_list == theirs["filter_list"]
    ours = {k: v for k, v in task.config.metric_list[0].items()}
    assert ours == theirs["metric_list"][0]
    assert task.config.doc_to_text == theirs["doc_to_text"] and task.config.doc_to_target == theirs["doc_to_target"]
    assert task.config.num_fewshot == theirs["num_fewshot"] == 8


def test_prompt_and_settings(task):
    task.build_all_requests(limit=1)
    (inst,) = task.instances
    shots = load_utils("gsm8k").gsm8k_cot_exemplars()
    question = task.test_docs()[0]["question"]
    assert inst.args[0] == "".join(f"Q: {s['question']}\nA: {s['target']}\n\n" for s in shots) + f"Q: {question}\nA:"
    assert inst.args[1] == {"until": ["Q:", "</s>", "<|im_end|>"], "do_sample": False, "max_gen_toks": 256,
                            "gen_length": 256, "block_length": 32}


def test_scoring(task):
    golds = [d["answer"].split("####")[-1].strip() for d in task.test_docs()]
    assert len(golds) == 3

    def respond(doc):
        gold = doc["answer"].split("####")[-1].strip()
        i = golds.index(gold)
        return [f"Work. The answer is {gold}.",                # strict and flexible right
                f"I think it is {gold}",                       # no marker: strict wrong, flexible right
                f"The answer is {int(gold) + 1}. Or {gold}"][i]  # strict wrong, flexible right (last number)

    results, samples = evaluate(task, respond)
    assert [s["exact_match"] for s in samples if s["filter"] == "strict-match"] == [1.0, 0.0, 0.0]
    assert [s["exact_match"] for s in samples if s["filter"] == "flexible-extract"] == [1.0, 1.0, 1.0]
    assert results["exact_match,strict-match"] == pytest.approx(1 / 3)
    assert results["exact_match,flexible-extract"] == 1.0
