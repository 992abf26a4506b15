"""tiny_gsm: the generator (scripts/tiny_gsm_data.py), the shipped JSONL, and GSM8K's answer extraction."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TASK_DIR = os.path.join(ROOT, "task_configs", "tiny_gsm")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import tiny_gsm_data  # noqa: E402


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_splits_are_what_the_seeded_generator_writes():
    test, train = read_jsonl(os.path.join(TASK_DIR, "test.jsonl")), read_jsonl(os.path.join(TASK_DIR, "train.jsonl"))
    assert test == tiny_gsm_data.generate(tiny_gsm_data.TEST_SEED, tiny_gsm_data.TEST_SIZE)
    assert train == tiny_gsm_data.splits(len(train))["train"]
    assert (len(test), len(train)) == (500, 1000)
    assert test[0] == {"question": "Sam saves $3 a week for 3 weeks, then spends $1. How much money is left?",
                       "answer": "3 * 3 = 9\n9 - 1 = 8\n#### 8", "template": "savings"}


def test_test_split_is_held_out_from_the_training_stream():
    test = {p["question"] for p in tiny_gsm_data.generate(tiny_gsm_data.TEST_SEED, tiny_gsm_data.TEST_SIZE)}
    train = tiny_gsm_data.splits(20000)["train"]
    assert len(test) == 500 and not test & {p["question"] for p in train}
    assert len({p["template"] for p in train}) == len(tiny_gsm_data.TEMPLATES) == 11


def test_every_solution_is_correct_arithmetic_ending_in_the_answer():
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for p in tiny_gsm_data.generate(7, 2000):
        *lines, final = p["answer"].split("\n")
        prev = None
        for line in lines:
            x, op, y, eq, z = line.split(" ")
            x, y, z = int(x), int(y), int(z)
            assert eq == "=" and ops[op](x, y) == z and (op != "/" or x % y == 0), p
            assert prev is None or prev in (x, y), p  # each step uses the previous result
            prev = z
        assert final == f"#### {prev}" and 0 < prev < 1000, p
        assert all(str(n) in p["question"] for n in re.findall(r"\d+", lines[0].split("=")[0])), p


def test_loader_finds_its_jsonl_from_any_directory_and_takes_an_override(tmp_path, monkeypatch):
    sys.path.insert(0, TASK_DIR)
    try:
        import utils as tiny_gsm_utils
    finally:
        sys.path.remove(TASK_DIR)
    monkeypatch.chdir(tmp_path)
    ds = tiny_gsm_utils.load_tiny_gsm(version=1.0)  # lm-eval passes the task's metadata as kwargs
    assert (ds["test"].num_rows, ds["train"].num_rows) == (500, 1000)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q?", "answer": "#### 3"}) + "\n")
    ds = tiny_gsm_utils.load_tiny_gsm(data_dir=str(tmp_path))
    assert list(ds) == ["test"] and ds["test"][0]["answer"] == "#### 3"


@pytest.fixture(scope="module")
def task():
    from lm_eval.tasks import TaskManager

    # only our configs: indexing lm-eval's thousands of built-in tasks takes longer than the tests
    tm = TaskManager(include_path=os.path.join(ROOT, "task_configs"), include_defaults=False)
    if hasattr(tm, "load"):  # lm-eval >= 0.4.10
        return tm.load("tiny_gsm")["tasks"]["tiny_gsm"]
    from lm_eval.tasks import get_task_dict

    return get_task_dict(["tiny_gsm"], tm)["tiny_gsm"]


@pytest.mark.parametrize("response, strict, flexible", [
    ("63 / 7 = 9\n#### 9", 1.0, 1.0),
    ("63 / 7 = 9\n#### 8", 0.0, 0.0),
    ("63 / 7 = 9\nThe answer is 9.", 0.0, 1.0),  # no "#### ": only the last-number filter finds it
    ("63 / 7 = 9\n#### 9\n9 + 1 = 10", 1.0, 0.0),  # strict takes the first "####", flexible the last number
    ("#### 90", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_answer_extraction_is_gsm8ks(task, response, strict, flexible):
    from lm_eval.api.instance import Instance

    doc = {"question": "Ava shares 63 shells equally among 7 friends. How many shells does each friend get?",
           "answer": "63 / 7 = 9\n#### 9"}
    inst = Instance("generate_until", doc, ("", {}), 0)
    inst.resps = [response]
    scores = {}
    for f in task._filters:
        f.apply([inst])
        scores[f.name] = task.process_results(doc, [inst.filtered_resps[f.name]])["exact_match"]
    assert scores == {"strict-match": strict, "flexible-extract": flexible}


def test_thousands_separator_and_dollar_sign_are_ignored(task):
    from lm_eval.api.instance import Instance

    doc = {"question": "", "answer": "#### 1234"}
    inst = Instance("generate_until", doc, ("", {}), 0)
    inst.resps = ["It costs $1,234."]
    for f in task._filters:
        f.apply([inst])
    assert task.process_results(doc, [inst.filtered_resps["flexible-extract"]])["exact_match"] == 1.0
    assert inst.filtered_resps["strict-match"] == "[invalid]"
