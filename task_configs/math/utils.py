"""MATH for diffusion LLMs: data (hub or local files) and answer scoring, both through lm-eval's ``minerva_math``.

Two protocols share this file (docs/tasks.md has the settings and the published numbers):

- ``minerva_math_dllm``: the 4-shot Minerva protocol (Lewkowycz et al. 2022) exactly as lm-eval's ``minerva_math``
  runs it: the four fixed exemplars, "Problem:\\n...\\n\\nSolution:", the answer read from "Final Answer: The
  final answer is X. I hope it is correct." and compared after Minerva's normalisation, by sympy equivalence
  (``exact_match``) and by ``math_verify`` on the whole response. Fast-dLLM's Table 1 "MATH (4-shot)".
- ``math500_dllm``: MATH-500 (Lightman et al. 2023's subset) zero-shot, the answer taken from the last
  ``\\boxed{...}`` of the response (TraDo / SDAR / d1-style tables), normalised and compared the same way.

Every scoring rule is lm-eval's own (``lm_eval.tasks.minerva_math.utils``: ``last_boxed_only_string``,
``remove_boxed``, ``normalize_final_answer``, ``is_equiv`` (sympy), ``math_verify``); nothing here re-implements
an equivalence check. lm-eval needs ``sympy``, ``antlr4-python3-runtime==4.11`` and ``math-verify`` for it:
``pip install -e ".[math]"``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Any, Optional

import datasets
from lm_eval.tasks.minerva_math import utils as minerva
from math_verify import parse, verify

# lm-eval's own prompt, exemplars and document processing (the YAMLs point here with !function).
doc_to_text = minerva.doc_to_text
list_fewshot_samples = minerva.list_fewshot_samples
process_docs = minerva.process_docs
process_results = minerva.process_results



def _sibling(family: str):
    """``task_configs/<family>/utils.py``, loaded by path as lm-eval loads a task's utils."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", family, "utils.py")
    spec = importlib.util.spec_from_file_location(f"lmeval_dllm_task_{family}_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Fast-dLLM packs the few-shot text into one user turn (task_configs/gsm8k/utils.py has the layout classes).
OneTurnFewshotTask = _sibling("gsm8k").OneTurnFewshotTask

MATH_HUB_PATH = "EleutherAI/hendrycks_math"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
MATH500_HUB_PATH = "HuggingFaceH4/MATH-500"
INVALID = "[invalidanswer]"
# The zero-shot instruction of the MATH-500 tables (the Qwen2.5-Math chain-of-thought prompt, used by SDAR / TraDo
# and d1-style dLLM evaluations).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# --------------------------------------------------------------------------------------------------------------
# Data


def load_math(math_path: Optional[str] = None, **_metadata: Any) -> datasets.DatasetDict:
    """MATH's ``test`` split (5000 problems: ``problem``, ``solution``, ``level``, ``type``), all seven subjects.

    lm-eval calls this with ``--metadata`` and ``--model_args`` entries as keyword arguments; only ``math_path`` is
    read: a ``.jsonl`` / ``.json`` / ``.parquet`` file, or a directory holding ``test.*`` (or hub-style
    ``<subject>/test-*.parquet`` folders, concatenated). Without it: the seven configs of
    ``EleutherAI/hendrycks_math`` from the hub, concatenated in lm-eval's subject order.
    """
    if not math_path:
        parts = [datasets.load_dataset(MATH_HUB_PATH, subject, split="test") for subject in MATH_SUBJECTS]
        return datasets.DatasetDict({"test": datasets.concatenate_datasets(parts)})
    return datasets.DatasetDict({"test": _read_split(math_path, "test", "math_path")})


def load_math500(math500_path: Optional[str] = None, **_metadata: Any) -> datasets.DatasetDict:
    """MATH-500's ``test`` split (``problem``, ``solution``, ``answer``, ``subject``, ``level``, ``unique_id``).

    Only ``math500_path`` is read: a file or a directory holding ``test.*`` as for :func:`load_math`. Without it:
    ``HuggingFaceH4/MATH-500`` from the hub.
    """
    if not math500_path:
        return datasets.DatasetDict({"test": datasets.load_dataset(MATH500_HUB_PATH, split="test")})
    return datasets.DatasetDict({"test": _read_split(math500_path, "test", "math500_path")})


def _read_split(path: str, split: str, arg: str) -> datasets.Dataset:
    if os.path.isfile(path):
        return _read_file(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{arg}={path!r} is neither a file nor a directory")
    for ext in (".jsonl", ".json", ".parquet"):
        if os.path.isfile(os.path.join(path, split + ext)):
            return _read_file(os.path.join(path, split + ext))
    parquet = sorted(glob.glob(os.path.join(path, "*", f"{split}-*.parquet")) +
                     glob.glob(os.path.join(path, f"{split}-*.parquet")))
    if parquet:
        return datasets.Dataset.from_parquet(parquet)
    raise FileNotFoundError(f"no {split}.jsonl / {split}.json / {split}*.parquet under {arg}={path!r}")


def _read_file(path: str) -> datasets.Dataset:
    if path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    if not rows or "problem" not in rows[0] or "solution" not in rows[0]:
        raise ValueError(f"{path}: expected MATH problems with 'problem' and 'solution' fields")
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------------------
# MATH-500: the answer is the last \boxed{...}


def math500_prompt(doc: dict) -> str:
    return doc["problem"] + "\n" + BOXED_INSTRUCTION


def math500_gold(doc: dict) -> str:
    """The gold answer, normalised as Minerva normalises (MATH-500 ships it in ``answer``; else the last box of
    the reference solution)."""
    answer = doc.get("answer") or minerva.remove_boxed(minerva.last_boxed_only_string(doc["solution"]))
    return minerva.normalize_final_answer(answer)


def boxed_answer(response: str) -> str:
    """The content of the response's last ``\\boxed{...}`` (or ``\\fbox{...}``), normalised; ``INVALID`` when there
    is none or its braces never close."""
    boxed = minerva.last_boxed_only_string(response)
    if boxed is None or not boxed.startswith(("\\boxed{", "\\boxed ")):
        return INVALID
    return minerva.normalize_final_answer(minerva.remove_boxed(boxed))


def math500_process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """``exact_match``: the last box equals the gold answer under lm-eval's sympy ``is_equiv``; ``math_verify``:
    lm-eval's second metric, ``math_verify`` of the whole response against the boxed gold answer."""
    response = results[0]
    answer = boxed_answer(response)
    gold = math500_gold(doc)
    exact = int(answer != INVALID and minerva.is_equiv(answer, gold))
    verified = int(bool(verify(gold=parse("$\\boxed{" + (doc.get("answer") or gold) + "}$"), target=parse(response))))
    return {"exact_match": exact, "math_verify": verified}
