"""mbpp_dllm (3-shot) and mbpp_instruct_dllm on the sanitized layout: data routes, prompts as lm-eval's mbpp /
mbpp_instruct, code extraction, and pass@1 by execution through a scripted model with known right and wrong code."""

from __future__ import annotations

import json
import os

import pytest
from scripted_lm import evaluate
from tasks_support import DATA, load_tasks, load_utils

MBPP_MINI = os.path.join(DATA, "mbpp_mini")
RIGHT = {11: "def add(a, b):\n    return a + b", 12: "def root_sum(a, b):\n    return math.sqrt(a + b)",
         13: "def reverse_string(s):\n    return s[::-1]"}
WRONG = {11: "def add(a, b):\n    return a - b", 12: "def root_sum(a, b):\n    return a + b",
         13: "def reverse_string(s):\n    return s"}


@pytest.fixture(scope="module")
def tasks() -> dict:
    return load_tasks(["mbpp_dllm", "mbpp_instruct_dllm"], mbpp_path=MBPP_MINI)


@pytest.fixture(scope="module")
def mbpp_utils():
    return load_utils("mbpp")


def test_fewshot_prompt_is_lm_evals_mbpp(tasks):
    task = tasks["mbpp_dllm"]
    task.build_all_requests(limit=1)
    (inst,) = task.instances
    with open(os.path.join(MBPP_MINI, "prompt.jsonl")) as f:
        shots = [json.loads(line) for line in f]
    block = ("You are an expert Python programmer, and here is your task: {} Your code should pass these tests:\n\n"
             "{}\n[BEGIN]\n")
    expected = "".join(block.format(s["prompt"], "\n".join(s["test_list"])) + s["code"] + "\n[DONE]\n\n"
                       for s in shots)
    expected += block.format("Write a python function to add two numbers.",
                             "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(0, 0) == 0")
    assert inst.args[0] == expected
    assert inst.args[1] == {"until": ["[DONE]"], "do_sample": False, "max_gen_toks": 256, "gen_length": 256,
                            "block_length": 32}


def test_fewshot_is_one_user_turn_under_a_chat_template(tasks):
    task = tasks["mbpp_dllm"]
    task.build_all_requests(limit=1, apply_chat_template=True, fewshot_as_multiturn=True,
                            chat_template=lambda m, add_generation_prompt=True: json.dumps(m))
    messages = json.loads(task.instances[0].args[0])
    assert [m["role"] for m in messages] == ["user"] and messages[0]["content"].count("[BEGIN]") == 4


@pytest.mark.parametrize("script, expected", [
    (lambda d: RIGHT[d["task_id"]], [1.0, 1.0, 1.0]),
    (lambda d: WRONG[d["task_id"]], [0.0, 0.0, 0.0]),
    (lambda d: RIGHT[d["task_id"]] + "\n[DONE]\nYou are an expert", [1.0, 1.0, 1.0]),       # cut at [DONE]
    (lambda d: "[BEGIN]\n" + RIGHT[d["task_id"]], [1.0, 1.0, 1.0]),                         # a repeated [BEGIN]
    (lambda d: "```python\n" + RIGHT[d["task_id"]] + "\n```\nDone.", [1.0, 1.0, 1.0]),      # fenced
    (lambda d: RIGHT[d["task_id"]] + "\nprint(", [0.0, 0.0, 0.0]),                           # syntax error
    (lambda d: "import math\n" + RIGHT[d["task_id"]].replace("(a + b)", "(a) + b"), [1.0, 0.0, 1.0]),
    (lambda d: "", [0.0, 0.0, 0.0]),
])
def test_fewshot_scoring(tasks, script, expected):
    results, samples = evaluate(tasks["mbpp_dllm"], script)
    assert [s["pass_at_1"] for s in samples] == expected
    assert results["pass_at_1,extract-code"] == pytest.approx(sum(expected) / 3)


def test_test_imports_are_provided(mbpp_utils):
    """root_sum uses math without importing it: the problem's test_imports supply it."""
    doc = {"test_imports": ["import math"], "test_list": ["assert root_sum(16, 9) == 5.0"]}
    assert mbpp_utils.process_results(doc, [RIGHT[12]]) == {"pass_at_1": 1.0}
    assert mbpp_utils.process_results({**doc, "test_imports": []}, [RIGHT[12]]) == {"pass_at_1": 0.0}


def test_exit_before_the_asserts_fails(mbpp_utils):
    doc = {"test_imports": [], "test_list": ["assert add(2, 3) == 5"]}
    assert mbpp_utils.process_results(doc, ["import sys\nsys.exit(0)"]) == {"pass_at_1": 0.0}
    assert mbpp_utils.process_results(doc, ["def add(a, b):\n    while True: pass"], timeout=1.0) == {"pass_at_1": 0.0}


def test_instruct_prompt_is_lm_evals_mbpp_instruct(tasks):
    task = tasks["mbpp_instruct_dllm"]
    task.build_all_requests(limit=1)
    (inst,) = task.instances
    assert inst.args[0].endswith("You are an expert Python programmer, and here is your task:\nWrite a python "
                                 "function to add two numbers.\nYour code should pass these tests:\nassert add(2, 3) "
                                 "== 5\nassert add(-1, 1) == 0\nassert add(0, 0) == 0\n```python\n")
    assert inst.args[0].count("```python\n") == 4 and inst.args[0].count("\n```\n\n") == 3
    assert inst.args[1] == {"until": [], "do_sample": False, "max_gen_toks": 512, "gen_length": 512,
                            "block_length": 32}


@pytest.mark.parametrize("script, expected", [
    (lambda d: RIGHT[d["task_id"]] + "\n```\nThis function works.", [1.0, 1.0, 1.0]),     # closes the fence
    (lambda d: RIGHT[d["task_id"]], [1.0, 1.0, 1.0]),                                      # never closes it
    (lambda d: "Here you go:\n```python\n" + RIGHT[d["task_id"]] + "\n```", [1.0, 1.0, 1.0]),  # prose, new fence
    (lambda d: WRONG[d["task_id"]] + "\n```\n```python\n" + RIGHT[d["task_id"]] + "\n```", [0.0, 0.0, 0.0]),
    (lambda d: "I cannot do that.", [0.0, 0.0, 0.0]),
])
def test_instruct_scoring(tasks, script, expected):
    results, samples = evaluate(tasks["mbpp_instruct_dllm"], script)
    assert [s["pass_at_1"] for s in samples] == expected
    assert results["pass_at_1,extract-code"] == pytest.approx(sum(expected) / 3)


def test_data_routes(mbpp_utils, tmp_path):
    data = mbpp_utils.load_mbpp(mbpp_path=MBPP_MINI)
    assert [len(data[s]) for s in ("test", "prompt")] == [3, 3]
    assert data["prompt"][0]["is_fewshot"] is True and data["test"][0]["is_fewshot"] is False
    # the original release's one file, split by task id; the full set's "text" field accepted
    rows = [{"task_id": i, "text": f"task {i}", "code": "pass", "test_list": ["assert True"]} for i in (2, 10, 11, 510,
                                                                                                      511)]
    single = tmp_path / "sanitized-mbpp.json"
    single.write_text(json.dumps(rows))
    data = mbpp_utils.load_mbpp(mbpp_path=str(single))
    assert data["prompt"]["task_id"] == [2, 10] and data["test"]["task_id"] == [11, 510]
    assert data["test"][0]["prompt"] == "task 11" and data["test"][0]["test_imports"] == []
    with pytest.raises(FileNotFoundError, match="mbpp_path"):
        mbpp_utils.load_mbpp(mbpp_path=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"task_id": 11}\n')
    (bad / "prompt.jsonl").write_text('{"task_id": 2}\n')
    with pytest.raises(ValueError, match="missing"):
        mbpp_utils.load_mbpp(mbpp_path=str(bad))
