"""GSM8K for diffusion LLMs: data (hub or local files), the two few-shot layouts, answer extraction, the metric.

Three protocols share this file (docs/tasks.md has the settings and the published numbers):

- ``gsm8k_fastdllm``: NVlabs/Fast-dLLM ``llada/eval_llada.py`` runs lm-eval's ``gsm8k`` 5-shot and wraps the
  whole few-shot text in ONE user turn. :class:`OneTurnFewshotTask` keeps that layout whatever
  ``--fewshot_as_multiturn`` says (lm-eval 0.4.13 turns it on by default with ``--apply_chat_template``).
- ``gsm8k_llada``: ML-GSAI/LLaDA's OpenCompass ``gsm8k_gen`` (= ``gsm8k_gen_1d7fe4``): four fixed exemplars as
  alternating user / assistant turns, "Let's think step by step". :class:`MultiTurnFewshotTask` keeps that.
- ``gsm8k_0shot_dllm``: one user turn, no exemplars.

Answers: ``strict-match`` reads the number after the answer marker the prompt teaches ("#### N" or
"The answer is N"); ``flexible-extract`` reads the last number of the response (lm-eval's and OpenCompass's
fallback). Both normalise the number (``$``, thousands commas, trailing zeros, units) before comparing with the
gold number after "####".
"""

from __future__ import annotations

import glob
import json
import os
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

import datasets
from lm_eval.api.task import ConfigurableTask

HUB_PATH, HUB_NAME = "openai/gsm8k", "main"
INVALID = "[invalid]"

# A number as written in an answer: optional sign, thousands commas only in groups of three, optional decimals.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# "#### 1,234", "The answer is $18.", "The final answer is: **42**": up to 12 non-digit characters between.
_MARKED_RE = re.compile(r"(?:####|\bthe (?:final )?answer is)[^\d\n-]{0,12}?(" + _NUMBER + ")", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------------
# Data


def load_gsm8k(gsm8k_path: Optional[str] = None, **_metadata: Any) -> datasets.DatasetDict:
    """The ``train`` and ``test`` splits of GSM8K (``question``, ``answer`` with "#### N").

    lm-eval calls this with ``--metadata`` and ``--model_args`` entries as keyword arguments; only ``gsm8k_path``
    is read. Without it the data come from the hub (``openai/gsm8k``, config ``main``). With it, a directory
    holding ``train`` and ``test`` files as ``.jsonl``, ``.json`` or ``.parquet`` (directly, under ``main/``, or
    as hub-style ``main/train-00000-of-00001.parquet``), e.g. ``--metadata '{"gsm8k_path": "/data/gsm8k"}'``.
    """
    if not gsm8k_path:
        return datasets.load_dataset(HUB_PATH, HUB_NAME)
    return datasets.DatasetDict({split: _read_split(gsm8k_path, split) for split in ("train", "test")})


def _read_split(directory: str, split: str) -> datasets.Dataset:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"gsm8k_path={directory!r} is not a directory (expected train/test .jsonl files)")
    for sub in ("", HUB_NAME):
        base = os.path.join(directory, sub, split)
        for ext in (".jsonl", ".json"):
            if os.path.isfile(base + ext):
                with open(base + ext, encoding="utf-8") as f:
                    rows = [json.loads(line) for line in f if line.strip()] if ext == ".jsonl" else json.load(f)
                return datasets.Dataset.from_list(rows)
        parquet = sorted(glob.glob(base + ".parquet") + glob.glob(base + "-*.parquet"))
        if parquet:
            return datasets.Dataset.from_parquet(parquet)
    raise FileNotFoundError(f"no {split}.jsonl / {split}.json / {split}*.parquet under gsm8k_path={directory!r}")


# --------------------------------------------------------------------------------------------------------------
# Few-shot layouts


class _FewshotLayoutTask(ConfigurableTask):
    """A YAML task (``class: !function utils.<subclass>``) whose few-shot layout is fixed by the protocol."""

    def __init__(self, config: Optional[dict] = None, **kwargs: Any):
        # lm-eval hands the whole YAML, ``class`` included, to the constructor; TaskConfig has no such field.
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)


class OneTurnFewshotTask(_FewshotLayoutTask):
    """The exemplars and the question are one user message (Fast-dLLM), even with ``--fewshot_as_multiturn``."""

    def fewshot_context(self, doc, num_fewshot, **kwargs):
        kwargs["fewshot_as_multiturn"] = False
        return super().fewshot_context(doc, num_fewshot, **kwargs)


class MultiTurnFewshotTask(_FewshotLayoutTask):
    """Each exemplar is a user turn and an assistant turn (LLaDA / OpenCompass) whenever a chat template is used."""

    def fewshot_context(self, doc, num_fewshot, **kwargs):
        kwargs["fewshot_as_multiturn"] = bool(kwargs.get("apply_chat_template"))
        return super().fewshot_context(doc, num_fewshot, **kwargs)


# The four exemplars of OpenCompass's gsm8k_gen_1d7fe4 (GSM8K training problems with step-by-step answers), as
# used by ML-GSAI/LLaDA's gsm8k numbers. Each answer ends with "The answer is N".
LLADA_EXEMPLARS = [
    {
        "question": "Angelo and Melanie want to plan how many hours over the next week they should study together "
        "for their test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. "
        "They figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for "
        "each worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to "
        "study total over the next week if they take a 10-minute break every hour, include 3 10-minute snack "
        "breaks each day, and 30 minutes for lunch each day?",
        "answer": "Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 "
        "chapters = 6 hours total.\nFor the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 "
        "hours x 4 worksheets = 6 hours total.\nAngelo and Melanie need to start with planning 12 hours to study, "
        "at 4 hours a day, 12 / 4 = 3 days.\nHowever, they need to include time for breaks and lunch. Every hour "
        "they want to include a 10-minute break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\n"
        "They also want to include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\nAnd they want to "
        "include 30 minutes for lunch each day, so 120 minutes for breaks + 30 minutes for snack breaks + 30 "
        "minutes for lunch = 180 minutes, or 180 / 60 minutes per hour = 3 extra hours.\nSo Angelo and Melanie "
        "want to plan 12 hours to study + 3 hours of breaks = 15 hours total.\nThey want to study no more than 4 "
        "hours each day, 15 hours / 4 hours each day = 3.75\nThey will need to plan to study 4 days to allow for "
        "all the time they need.\nThe answer is 4\n",
    },
    {
        "question": "Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents "
        "score double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points "
        "scored by both teams added together?",
        "answer": "Mark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\nHis team "
        "also scores 6 3 pointers, meaning they scored 8*3= 24 points in 3 pointers\nThey scored 10 free throws, "
        "and free throws count as one point so they scored 10*1=10 points in free throws.\nAll together his team "
        "scored 50+24+10= 84 points\nMark's opponents scored double his team's number of 2 pointers, meaning they "
        "scored 50*2=100 points in 2 pointers.\nHis opponents scored half his team's number of 3 pointers, meaning "
        "they scored 24/2= 12 points in 3 pointers.\nThey also scored half Mark's team's points in free throws, "
        "meaning they scored 10/2=5 points in free throws.\nAll together Mark's opponents scored 100+12+5=117 "
        "points\nThe total score for the game is both team's scores added together, so it is 84+117=201 points\n"
        "The answer is 201\n",
    },
    {
        "question": "Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. "
        "If she buys 2/5 times more of each item, what would be the total number of the items she will have if "
        "she currently has 60 marbles?",
        "answer": "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = "
        "24\nThe total number of marbles she'll have is 60+24 = 84\nIf Bella currently has 60 marbles, and she has "
        "two times as many marbles as frisbees, she has 60/2 = 30 frisbees.\nIf Bella buys 2/5 times more "
        "frisbees, she'll have 2/5*30 = 12 more frisbees.\nThe total number of frisbees she'll have will increase "
        "to 30+12 = 42\nBella also has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\nIf "
        "she buys 2/5 times more deck cards, she'll have 2/5*10 = 4 more deck cards.\nThe total number of deck "
        "cards she'll have is 10+4 = 14\nTogether, Bella will have a total of 14+42+84 = 140 items\n"
        "The answer is 140\n",
    },
    {
        "question": "A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three "
        "baskets and 2 less of each fruit in the fourth basket. How many fruits are there?",
        "answer": "For the first three baskets, the number of apples and oranges in one basket is 9+15=24\nIn "
        "total, together with bananas, the number of fruits in one basket is 24+14=38 for the first three "
        "baskets.\nSince there are three baskets each having 38 fruits, there are 3*38=114 fruits in the first "
        "three baskets.\nThe number of apples in the fourth basket is 9-2=7\nThere are also 15-2=13 oranges in "
        "the fourth basket\nThe combined number of oranges and apples in the fourth basket is 13+7=20\nThe "
        "fourth basket also contains 14-2=12 bananas.\nIn total, the fourth basket has 20+12=32 fruits.\nThe "
        "four baskets together have 32+114=146 fruits.\nThe answer is 146\n",
    },
]


def llada_exemplars() -> list[dict[str, str]]:
    return [dict(e) for e in LLADA_EXEMPLARS]


# --------------------------------------------------------------------------------------------------------------
# Answers


def normalize_number(text: str) -> str:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '-3' -> '-3'; anything unparsable -> ``INVALID``."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return INVALID
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gold_answer(doc: dict) -> str:
    """The normalised number after "####" in a GSM8K solution."""
    return normalize_number(doc["answer"].split("####")[-1])


def strict_answer(response: str) -> str:
    """The number after the first answer marker ("#### N" / "The answer is N"), or ``INVALID``."""
    match = _MARKED_RE.search(response)
    return normalize_number(match.group(1)) if match else INVALID


def flexible_answer(response: str) -> str:
    """The last number in the response, or ``INVALID``."""
    numbers = _NUMBER_RE.findall(response)
    return normalize_number(numbers[-1]) if numbers else INVALID


def strict_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[strict_answer(r) for r in rs] for rs in resps]


def flexible_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[flexible_answer(r) for r in rs] for rs in resps]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``results[0]`` is the filtered (already normalised) answer of one filter pipeline."""
    return {"exact_match": float(results[0] != INVALID and results[0] == gold_answer(doc))}


# --------------------------------------------------------------------------------------------------------------
# gsm8k_cot_dllm: lm-eval's gsm8k_cot exemplars, read from lm-eval's own YAML (no copy to drift from it)


def lm_eval_gsm8k_cot_config() -> dict:
    """lm-eval's ``tasks/gsm8k/gsm8k-cot.yaml`` as a dict (plain YAML: it has no ``!function`` tags)."""
    import lm_eval.tasks
    import yaml

    path = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "gsm8k", "gsm8k-cot.yaml")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def gsm8k_cot_exemplars() -> list[dict[str, str]]:
    """The 8 chain-of-thought exemplars (``question``, ``target`` ending "The answer is N.") of Wei et al. 2022."""
    return [dict(s) for s in lm_eval_gsm8k_cot_config()["fewshot_config"]["samples"]]
