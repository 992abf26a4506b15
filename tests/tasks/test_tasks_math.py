"""minerva_math_dllm and math500_dllm: lm-eval's minerva_math prompt, exemplars and scoring (sympy equivalence and
math_verify) on local files, through a scripted model whose right and wrong answers are known."""

from __future__ import annotations

import os

import pytest
from scripted_lm import evaluate
from tasks_support import DATA, load_tasks

pytest.importorskip("math_verify", reason="MATH scoring needs the math extra: pip install -e '.[math]'")
MATH_MINI, MATH500_MINI = os.path.join(DATA, "math_mini"), os.path.join(DATA, "math500_mini.jsonl")


@pytest.fixture(scope="module")
def tasks() -> dict:
    return load_tasks(["minerva_math_dllm", "math500_dllm"], math_path=MATH_MINI, math500_path=MATH500_MINI)


@pytest.fixture(scope="module")
def math_utils():
    from tasks_support import load_utils

    return load_utils("math")


def minerva_answer(ans: str) -> str:
    return f"Some work.\nFinal Answer: The final answer is ${ans}$. I hope it is correct."


def test_minerva_prompt_and_settings_are_lm_evals(tasks):
    from lm_eval.tasks.minerva_math import utils as minerva

    task = tasks["minerva_math_dllm"]
    task.build_all_requests(limit=1)
    (inst,) = task.instances
    shots = minerva.list_fewshot_samples()
    expected = "".join(f"Problem:\n{s['problem']}\n\nSolution: {s['solution']}\n\n" for s in shots)
    assert inst.args[0] == expected + "Problem:\nWhat is $2+3$?\n\nSolution:"
    assert inst.args[1] == {"until": ["Problem:"], "do_sample": False, "max_gen_toks": 256, "gen_length": 256,
                            "block_length": 32}
    assert [d["answer"] for d in task.test_docs()] == ["5", "\\frac{3}{4}", "[1,4)"]


@pytest.mark.parametrize("responses, exact, verified", [
    (["5", "\\frac{3}{4}", "[1,4)"], [1, 1, 1], [1, 1, 1]),                  # gold as written
    (["5.0", "0.75", "[1, 4)"], [1, 1, 1], [1, 1, 1]),                       # sympy-equal / spacing normalised
    (["\\frac{10}{2}", "\\dfrac{3}{4}", "(1,4)"], [1, 1, 0], [1, 1, 0]),     # equivalent; open interval is not
    (["6", "4/3", "[1,4]"], [0, 0, 0], [0, 0, 0]),                           # wrong
])
def test_minerva_scoring(tasks, responses, exact, verified):
    answers = dict(zip(["What is $2+3$?", "Simplify $\\frac{6}{8}$.", "Find the interval of $x$ with $1 \\le x < 4$."],
                       responses))
    results, samples = evaluate(tasks["minerva_math_dllm"], lambda doc: minerva_answer(answers[doc["problem"]]))
    assert [s["exact_match"] for s in samples] == exact
    assert [s["math_verify"] for s in samples] == verified
    assert results["exact_match,none"] == pytest.approx(sum(exact) / 3)


def test_minerva_needs_the_final_answer_sentence(tasks):
    """A boxed answer without "Final Answer: The final answer is ..." fails exact_match (lm-eval's rule), while
    math_verify, which reads the whole response, still finds it."""
    results, samples = evaluate(tasks["minerva_math_dllm"], lambda doc: f"So it is $\\boxed{{{doc['answer']}}}$.")
    assert [s["exact_match"] for s in samples] == [0, 0, 0]
    assert [s["math_verify"] for s in samples] == [1, 1, 1]


def test_math500_prompt_and_settings(tasks):
    task = tasks["math500_dllm"]
    task.build_all_requests(limit=1)
    (inst,) = task.instances
    assert inst.args[0] == "What is $7\\cdot 6$?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert inst.args[1] == {"until": [], "do_sample": False, "max_gen_toks": 512, "gen_length": 512,
                            "block_length": 32}


@pytest.mark.parametrize("response, answer", [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{7}, then \\boxed{42}", "42"),                       # the LAST box counts
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),                            # nested braces
    ("\\boxed{5\\sqrt{2}\\text{ units}}", "5\\sqrt{2}"),                  # Minerva normalisation drops units
    ("\\fbox{9}", "[invalidanswer]"),                                     # \fbox is not a \boxed answer
    ("\\boxed{42", "[invalidanswer]"),                                    # unclosed
    ("The answer is 42.", "[invalidanswer]"),                             # no box
])
def test_boxed_extraction(math_utils, response, answer):
    assert math_utils.boxed_answer(response) == answer


@pytest.mark.parametrize("responses, exact", [
    (["\\boxed{42}", "\\boxed{5\\sqrt{2}}", "\\boxed{\\frac{3}{4}}"], [1, 1, 1]),
    (["\\boxed{42.0}", "\\boxed{\\sqrt{50}}", "\\boxed{0.75}"], [1, 1, 1]),       # sympy-equal
    (["\\boxed{41}", "\\boxed{5\\sqrt{3}}", "3/4 without a box"], [0, 0, 0]),
    (["42", "\\boxed{7} then \\boxed{5\\sqrt{2}}", "\\boxed{3/4} and \\boxed{1}"], [0, 1, 0]),
])
def test_math500_scoring(tasks, responses, exact):
    by_id = dict(zip(["test/prealgebra/1.json", "test/algebra/2.json", "test/prealgebra/3.json"], responses))
    results, samples = evaluate(tasks["math500_dllm"], lambda doc: by_id[doc["unique_id"]])
    assert [s["exact_match"] for s in samples] == exact
    assert results["exact_match,none"] == pytest.approx(sum(exact) / 3)


def test_math500_math_verify_reads_the_whole_response(tasks):
    results, samples = evaluate(tasks["math500_dllm"], lambda doc: f"$x = {doc['answer']}$")
    assert [s["exact_match"] for s in samples] == [0, 0, 0] and [s["math_verify"] for s in samples] == [1, 1, 1]


def test_bad_paths(math_utils, tmp_path):
    with pytest.raises(FileNotFoundError, match="math_path"):
        math_utils.load_math(math_path=str(tmp_path / "missing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="'problem' and 'solution'"):
        math_utils.load_math500(math500_path=str(bad))
    assert len(math_utils.load_math500(math500_path=MATH500_MINI)["test"]) == 3
