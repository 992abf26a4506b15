"""GSM8K task configs: prompt layouts per protocol, answer extraction, the metric, data routes."""

from __future__ import annotations

import json
import os

import pytest
from tasks_support import GSM8K_MINI


def chat_template(tokenizer):
    """What lm-eval's ``--apply_chat_template`` hands the task: messages -> rendered prompt."""

    def render(messages, add_generation_prompt=True):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)

    return render


@pytest.fixture(scope="module")
def llada_tokenizer(llada_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llada_dir)


def context(task, doc, tokenizer, fewshot_as_multiturn=True):
    return task.fewshot_context(doc, num_fewshot=task.config.num_fewshot, apply_chat_template=True,
                                fewshot_as_multiturn=fewshot_as_multiturn, chat_template=chat_template(tokenizer))


USER, ASSISTANT = "<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>"


# ------------------------------------------------------------------------------------------------------------------
# Answer extraction (crafted outputs, exact values)


@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("$1,234.50", "1234.5"), ("18.00", "18"), ("0.50", "0.5"), ("-3", "-3"), ("5.", "5"),
    ("007", "7"), ("twelve", "[invalid]"), ("", "[invalid]"),
])
def test_normalize_number(gsm8k_utils, text, expected):
    assert gsm8k_utils.normalize_number(text) == expected


@pytest.mark.parametrize("response, expected", [
    ("3 boxes of 4 is 12.\n#### 12", "12"),
    ("#### 1,234", "1234"),
    ("#### $1,234.50", "1234.5"),
    ("So she pays 18 dollars.\nThe answer is 18.", "18"),
    ("The final answer is: **-3**", "-3"),
    ("The answer is $18.00 dollars", "18"),
    ("the Answer is 7 apples, not 8", "7"),
    ("The answer is 4\nThe answer is 5", "4"),          # the first marker: later text is continuation noise
    ("He has 12 apples and 3 pears.", "[invalid]"),     # no marker: strict refuses to guess
    ("####\n", "[invalid]"),
])
def test_strict_answer(gsm8k_utils, response, expected):
    assert gsm8k_utils.strict_answer(response) == expected


@pytest.mark.parametrize("response, expected", [
    ("He has 12 apples and 3 pears.", "3"),
    ("Total: $1,000.", "1000"),
    ("2.5 * 4 = 10.00", "10"),
    ("From 10 down to -4", "-4"),
    ("#### 12\nNote: 3 boxes", "3"),                    # last number, as lm-eval's flexible-extract
    ("1, 2, 3", "3"),                                   # a list is not a thousands group
    ("no numbers here", "[invalid]"),
])
def test_flexible_answer(gsm8k_utils, response, expected):
    assert gsm8k_utils.flexible_answer(response) == expected


def test_gold_answer(gsm8k_utils):
    assert gsm8k_utils.gold_answer({"answer": "125*8=<<125*8=1000>>1000\n#### 1,000"}) == "1000"
    assert gsm8k_utils.gold_answer({"answer": "#### 72"}) == "72"


def test_process_results_never_matches_invalid(gsm8k_utils):
    doc = {"answer": "#### 12"}
    assert gsm8k_utils.process_results(doc, ["12"]) == {"exact_match": 1.0}
    assert gsm8k_utils.process_results(doc, ["13"]) == {"exact_match": 0.0}
    assert gsm8k_utils.process_results({"answer": "no marker"}, ["[invalid]"]) == {"exact_match": 0.0}


# ------------------------------------------------------------------------------------------------------------------
# The metric through each task's own filters and process_results


# Crafted responses for the three test docs of the mini set (golds 42, 14, 900) and the expected scores.
CRAFTED = [
    ("6 rows of 7 trees is 6*7=42.\n#### 42", {"strict-match": 1.0, "flexible-extract": 1.0}),
    ("The answer is 14 dollars. Check: 50-36", {"strict-match": 1.0, "flexible-extract": 0.0}),
    ("1,200 * 3/4 = 900 students", {"strict-match": 0.0, "flexible-extract": 1.0}),
]


@pytest.mark.parametrize("name", ["gsm8k_fastdllm", "gsm8k_llada", "gsm8k_0shot_dllm"])
def test_task_scores_crafted_outputs(gsm8k_tasks, name):
    task = gsm8k_tasks[name]
    task.build_all_requests(limit=3)
    assert [i.doc["answer"].split("#### ")[-1] for i in task.instances] == ["42", "14", "900"]
    for inst, (response, _) in zip(task.instances, CRAFTED):
        inst.resps = [response]
    task.apply_filters()
    for inst, (_, expected) in zip(task.instances, CRAFTED):
        scores = {f: task.process_results(inst.doc, [inst.filtered_resps[f]]) for f in expected}
        assert scores == {f: {"exact_match": v} for f, v in expected.items()}, inst.filtered_resps


# ------------------------------------------------------------------------------------------------------------------
# Prompt layouts


def test_fastdllm_prompt_is_one_user_turn(gsm8k_tasks, llada_tokenizer):
    """Fast-dLLM packs the 5 exemplars and the question into one user turn, even with fewshot_as_multiturn."""
    task = gsm8k_tasks["gsm8k_fastdllm"]
    doc = task.test_docs()[0]
    for multiturn in (True, False):
        ctx = context(task, doc, llada_tokenizer, fewshot_as_multiturn=multiturn)
        assert ctx.count(USER) == 1 and ctx.count(ASSISTANT) == 1
        assert ctx.count("Question: ") == 6 and ctx.count("\n#### ") == 5
        assert ctx.endswith(f"Question: {doc['question']}\nAnswer:<|eot_id|>{ASSISTANT}\n\n")
    train_questions = {d["question"] for d in task.training_docs()}
    shown = [part.split("\nAnswer:")[0] for part in ctx.split("Question: ")[1:-1]]
    assert len(shown) == 5 and set(shown) <= train_questions


def test_llada_prompt_is_multi_turn_with_fixed_exemplars(gsm8k_tasks, gsm8k_utils, llada_tokenizer):
    """LLaDA / OpenCompass gsm8k_gen: 4 fixed exemplars as user/assistant turns, even with multiturn off."""
    task = gsm8k_tasks["gsm8k_llada"]
    doc = task.test_docs()[1]
    for multiturn in (True, False):
        ctx = context(task, doc, llada_tokenizer, fewshot_as_multiturn=multiturn)
        assert ctx.count(USER) == 5 and ctx.count(ASSISTANT) == 5  # 4 exemplar answers + the generation prompt
        assert ctx.count("Let's think step by step\nAnswer:<|eot_id|>") == 5
    turns = ctx.split(USER)[1:]
    for turn, exemplar in zip(turns, gsm8k_utils.LLADA_EXEMPLARS):
        question, answer = turn.split(ASSISTANT)
        assert question == f"\n\nQuestion: {exemplar['question']}\nLet's think step by step\nAnswer:<|eot_id|>"
        assert answer == "\n\n" + exemplar["answer"].strip() + "<|eot_id|>"
    assert turns[-1] == f"\n\nQuestion: {doc['question']}\nLet's think step by step\nAnswer:<|eot_id|>{ASSISTANT}\n\n"


def test_zero_shot_prompt(gsm8k_tasks, llada_tokenizer):
    task = gsm8k_tasks["gsm8k_0shot_dllm"]
    doc = task.test_docs()[2]
    assert context(task, doc, llada_tokenizer) == (
        f"<|startoftext|>{USER}\n\n{doc['question']}\nLet's think step by step. End your response with "
        f"\"The answer is N\", where N is the final numerical answer.<|eot_id|>{ASSISTANT}\n\n"
    )


def test_generation_kwargs_carry_the_protocols(gsm8k_tasks):
    kwargs = {name: dict(task.config.generation_kwargs) for name, task in gsm8k_tasks.items()}
    assert kwargs["gsm8k_fastdllm"] == {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                        "max_gen_toks": 256, "gen_length": 256, "block_length": 32}
    assert kwargs["gsm8k_llada"] == {"until": ["Question:"], "do_sample": False, "max_gen_toks": 512,
                                     "gen_length": 512, "block_length": 512,
                                     "confidence_eos_eot_inf": True}
    assert kwargs["gsm8k_0shot_dllm"] == {"until": [], "do_sample": False, "max_gen_toks": 256, "gen_length": 256,
                                          "block_length": 32}
    assert {n: t.config.num_fewshot for n, t in gsm8k_tasks.items()} == {
        "gsm8k_fastdllm": 5, "gsm8k_llada": 4, "gsm8k_0shot_dllm": 0}


# ------------------------------------------------------------------------------------------------------------------
# Data routes


def test_default_route_is_the_hub(gsm8k_utils, monkeypatch):
    calls = []
    monkeypatch.setattr(gsm8k_utils.datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "hub")
    assert gsm8k_utils.load_gsm8k(pretrained="ignored", version=1.0) == "hub"
    assert calls == [(("openai/gsm8k", "main"), {})]


def test_local_jsonl_and_hub_layout_parquet(gsm8k_utils, tmp_path):
    local = gsm8k_utils.load_gsm8k(gsm8k_path=GSM8K_MINI)
    assert {k: len(v) for k, v in local.items()} == {"train": 7, "test": 3}
    # The hub snapshot layout: main/<split>-00000-of-00001.parquet
    os.makedirs(tmp_path / "main")
    for split in ("train", "test"):
        with open(os.path.join(GSM8K_MINI, f"{split}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        gsm8k_utils.datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "main" / f"{split}-00000-of-00001.parquet"))
    snapshot = gsm8k_utils.load_gsm8k(gsm8k_path=str(tmp_path))
    assert snapshot["test"]["answer"] == local["test"]["answer"]
    with pytest.raises(FileNotFoundError, match="gsm8k_path"):
        gsm8k_utils.load_gsm8k(gsm8k_path=str(tmp_path / "nowhere"))
