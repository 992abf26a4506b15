"""tiny_gsm: GSM8K-style arithmetic word problems small enough for a few-million-parameter model.

Every problem is a short story with named people and objects, one to three operations (+, -, *, /) and a
solution in GSM8K's shape: one equation per line, then ``#### <answer>``. Answers are positive integers, so
GSM8K's answer extraction applies unchanged. Example::

    question: Mia has 34 shells. She buys 18 more, then gives 7 to Leo. How many shells does Mia have now?
    answer:   34 + 18 = 52
              52 - 7 = 45
              #### 45

Splits are fixed by seeds: ``test`` is ``generate(TEST_SEED, n)``; ``train`` is ``generate(TRAIN_SEED, n,
exclude=test questions)``, so no test question is ever trained on. Same seed, same problems (Python's
``random.Random`` is stable across versions for ``randint``/``choice``).

    python scripts/tiny_gsm_data.py --out task_configs/tiny_gsm      # writes test.jsonl and train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Callable, Iterable, Optional

TEST_SEED, TRAIN_SEED = 1234, 0
TEST_SIZE = 500
TRAIN_SAMPLE_SIZE = 1000  # written to train.jsonl (few-shot pool, inspection); training draws many more

NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Max", "he"),
         ("Ivy", "she"), ("Ben", "he"), ("Eva", "she"), ("Tom", "he"), ("Amy", "she"), ("Dan", "he"),
         ("Lily", "she"), ("Omar", "he"), ("Nina", "she"), ("Raj", "he"), ("Emma", "she"), ("Jack", "he")]
ITEMS = ["apples", "shells", "stickers", "marbles", "pencils", "cookies", "cards", "stamps", "coins", "books",
         "eggs", "balloons", "candies", "beads", "toys"]


def _people(rng: random.Random, k: int) -> list[tuple[str, str]]:
    return rng.sample(NAMES, k)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# Each template: rng -> (question, [(x, op, y, z), ...]); the last z is the answer. Templates draw numbers so
# every intermediate result is a positive integer below 1000 and every division is exact.

def add_sub(rng):
    (a_name, a_pro), (b_name, _) = _people(rng, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(10, 90), rng.randint(5, 60)
    c = rng.randint(2, a + b - 1)
    q = (f"{a_name} has {a} {item}. {_cap(a_pro)} buys {b} more, then gives {c} to {b_name}. "
         f"How many {item} does {a_name} have now?")
    return q, [(a, "+", b, a + b), (a + b, "-", c, a + b - c)]


def mul_add(rng):
    (a_name, a_pro), = _people(rng, 1)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(3, 25), rng.randint(2, 60)
    q = (f"{a_name} buys {a} bags of {item} with {b} {item} in each bag. {_cap(a_pro)} already had {c}. "
         f"How many {item} does {a_pro} have now?")
    return q, [(a, "*", b, a * b), (a * b, "+", c, a * b + c)]


def add_div(rng):
    (a_name, a_pro), = _people(rng, 1)
    item = rng.choice(ITEMS)
    c, r = rng.randint(2, 9), rng.randint(2, 15)
    s = c * r
    a = rng.randint(1, s - 1)
    q = (f"{a_name} has {a} {item} and finds {s - a} more. {_cap(a_pro)} shares them equally among {c} friends. "
         f"How many {item} does each friend get?")
    return q, [(a, "+", s - a, s), (s, "/", c, r)]


def change(rng):
    (a_name, a_pro), = _people(rng, 1)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    c = rng.choice([x for x in (20, 50, 100, 200) if x > a * b])
    q = f"{a_name} buys {a} {item} for ${b} each and pays with ${c}. How much change does {a_pro} get?"
    return q, [(a, "*", b, a * b), (c, "-", a * b, c - a * b)]


def pages(rng):
    (a_name, _), = _people(rng, 1)
    a, b, d = rng.randint(3, 20), rng.randint(2, 9), rng.randint(2, 30)
    c = a * b + d + rng.randint(1, 200)
    q = (f"{a_name} reads {a} pages a day for {b} days and {d} pages on Sunday. The book has {c} pages. "
         f"How many pages are left?")
    return q, [(a, "*", b, a * b), (a * b, "+", d, a * b + d), (c, "-", a * b + d, c - a * b - d)]


def times_as_many(rng):
    (a_name, _), (b_name, _) = _people(rng, 2)
    item = rng.choice(ITEMS)
    a, k = rng.randint(3, 40), rng.randint(2, 6)
    q = (f"{a_name} has {a} {item}. {b_name} has {k} times as many {item} as {a_name}. "
         f"How many {item} do they have together?")
    return q, [(a, "*", k, a * k), (a, "+", a * k, a + a * k)]


def sub_div(rng):
    (a_name, a_pro), = _people(rng, 1)
    item = rng.choice(ITEMS)
    c, r = rng.randint(2, 9), rng.randint(2, 15)
    b = rng.randint(1, 40)
    a = c * r + b
    q = (f"{a_name} bakes {a} {item} and eats {b}. {_cap(a_pro)} packs the rest in boxes of {c}. "
         f"How many boxes does {a_pro} fill?")
    return q, [(a, "-", b, a - b), (a - b, "/", c, r)]


def savings(rng):
    (a_name, _), = _people(rng, 1)
    a, b = rng.randint(3, 25), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    q = f"{a_name} saves ${a} a week for {b} weeks, then spends ${c}. How much money is left?"
    return q, [(a, "*", b, a * b), (a * b, "-", c, a * b - c)]


def fewer_more(rng):
    (a_name, _), (b_name, _), (c_name, _) = _people(rng, 3)
    item = rng.choice(ITEMS)
    a = rng.randint(20, 95)
    b, c = rng.randint(1, a - 1), rng.randint(2, 50)
    q = (f"{a_name} has {a} {item}. {b_name} has {b} fewer than {a_name}, and {c_name} has {c} more than "
         f"{b_name}. How many {item} does {c_name} have?")
    return q, [(a, "-", b, a - b), (a - b, "+", c, a - b + c)]


def rows(rng):
    a, b = rng.randint(2, 12), rng.randint(3, 20)
    c = rng.randint(1, a * b - 1)
    q = f"A hall has {a} rows of {b} chairs. {c} chairs are taken. How many chairs are free?"
    return q, [(a, "*", b, a * b), (a * b, "-", c, a * b - c)]


def share(rng):
    (a_name, _), = _people(rng, 1)
    item = rng.choice(ITEMS)
    b, r = rng.randint(2, 9), rng.randint(2, 30)
    q = f"{a_name} shares {b * r} {item} equally among {b} friends. How many {item} does each friend get?"
    return q, [(b * r, "/", b, r)]


TEMPLATES: list[Callable[[random.Random], tuple[str, list]]] = [
    add_sub, mul_add, add_div, change, pages, times_as_many, sub_div, savings, fewer_more, rows, share,
]


def solution(steps: list[tuple[int, str, int, int]]) -> str:
    """GSM8K's answer shape: one equation per line, then ``#### <answer>``."""
    lines = [f"{x} {op} {y} = {z}" for x, op, y, z in steps]
    return "\n".join(lines + [f"#### {steps[-1][3]}"])


def make_problem(rng: random.Random) -> dict:
    template = rng.choice(TEMPLATES)
    question, steps = template(rng)
    assert all(z > 0 and z < 1000 for *_, z in steps), (template.__name__, steps)
    return {"question": question, "answer": solution(steps), "template": template.__name__}


def generate(seed: int, n: int, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` distinct problems (by question text) drawn with ``seed``, none whose question is in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        p = make_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def splits(train_size: int, test_size: int = TEST_SIZE) -> dict[str, list[dict]]:
    test = generate(TEST_SEED, test_size)
    return {"test": test, "train": generate(TRAIN_SEED, train_size, exclude=(p["question"] for p in test))}


def write_jsonl(path: str, rows_: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows_:
            f.write(json.dumps(r) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                                    "task_configs", "tiny_gsm")))
    ap.add_argument("--test_size", type=int, default=TEST_SIZE)
    ap.add_argument("--train_size", type=int, default=TRAIN_SAMPLE_SIZE)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, rows_ in splits(args.train_size, args.test_size).items():
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), rows_)
        print(f"wrote {len(rows_)} problems to {os.path.join(args.out, name + '.jsonl')}")


if __name__ == "__main__":
    main()
