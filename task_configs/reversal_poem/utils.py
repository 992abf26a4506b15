"""The reversal-curse poem task of the LLaDA paper (arXiv:2502.09992, Sec. 3.3 / Table 4).

Given one line of a classical Chinese couplet, produce the next line (forward) or the previous line (reverse).
Prompts, decoding and metric follow ML-GSAI/LLaDA ``eval_reverse.py``: the line, the question
"的下一句是什么？" (what is the next line?) or "的上一句是什么？" (the previous line?), then " 直接输出句子即可。"
(just output the sentence), as one user turn; greedy, 28 tokens in one block, EOS logit -inf; an item is correct
when the gold line is a substring of the output (no normalisation).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import datasets

# The published file (469 pairs {first, second, source}); the paper says 496.
POEM_URL = "https://raw.githubusercontent.com/ML-GSAI/LLaDA/main/data/poem_data.json"
ANSWER_SUFFIX = " 直接输出句子即可。"
NEXT_QUESTION = "的下一句是什么？"
PREVIOUS_QUESTION = "的上一句是什么？"


def load_poems(poem_path: Optional[str] = None, **_metadata: Any) -> datasets.DatasetDict:
    """The pairs as a ``test`` split: ``first``, ``second``, ``source``.

    lm-eval calls this with ``--metadata`` and ``--model_args`` entries as keyword arguments; only ``poem_path``
    is read: a local copy of ``poem_data.json`` (or another URL). Default: the published file, downloaded once
    into the datasets cache (offline mode uses the cached copy if there is one).
    """
    source = poem_path or POEM_URL
    if os.path.exists(source):
        local = source
    elif source.startswith(("http://", "https://")):
        local = _cached_download(source)
    else:
        raise FileNotFoundError(f"poem_path={source!r}: no such file (give a path to poem_data.json or a URL)")
    with open(local, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not rows or not all({"first", "second"} <= set(r) for r in rows):
        raise ValueError(f"{source}: expected a JSON list of {{first, second, source}} objects")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"first": r["first"], "second": r["second"], "source": r.get("source", "")} for r in rows])})


def _cached_download(url: str) -> str:
    from datasets.utils.file_utils import cached_path

    try:
        return cached_path(url)
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise ConnectionError(
            f"cannot download {url} ({e}); offline, pass a local copy: --metadata '{{\"poem_path\": FILE}}'"
        ) from e


def forward_prompt(doc: dict) -> str:
    return doc["first"] + NEXT_QUESTION + ANSWER_SUFFIX


def reverse_prompt(doc: dict) -> str:
    return doc["second"] + PREVIOUS_QUESTION + ANSWER_SUFFIX


def contains_gold(gold: str, output: str) -> float:
    return float(gold in output)


def process_forward(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": contains_gold(doc["second"], results[0])}


def process_reverse(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": contains_gold(doc["first"], results[0])}
