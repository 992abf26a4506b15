"""MBPP for diffusion LLMs: the sanitized problems (hub or local files), code extraction, pass@1 by execution.

Two protocols share this file (docs/tasks.md has the settings and the published numbers):

- ``mbpp_dllm``: lm-eval's ``mbpp`` 3-shot prompt ("You are an expert Python programmer, and here is your task:
  ... Your code should pass these tests:\\n\\n<tests>\\n[BEGIN]\\n", exemplar code closed by "[DONE]"), over the
  sanitized set (Austin et al. 2021's hand-checked 427 problems; 257 in ``test``), the three exemplars the first
  three of its ``prompt`` split (task ids 2, 3, 4, the ones lm-eval's ``mbpp`` also uses). Fast-dLLM's Table 1
  "MBPP (3-shot)".
- ``mbpp_instruct_dllm``: lm-eval's ``mbpp_instruct`` prompt (the task and its tests in a user turn, the assistant
  turn opened with a python fence), zero-shot as Dream-Coder and the dLLM leaderboards run instruct models.

Each program is the problem's ``test_imports``, the model's code and the problem's asserts, run in a fresh Python
process by the same runner as ``humaneval_instruct_dllm`` (``task_configs/humaneval/utils.py``): lm-eval's own
``code_eval`` metric loads its script from the Hugging Face hub, which the offline runs cannot reach.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import Any, Optional

import datasets

HUB_PATH, HUB_NAME = "google-research-datasets/mbpp", "sanitized"
FIELDS = ("task_id", "prompt", "code", "test_imports", "test_list")
SPLITS = ("test", "prompt")


def _sibling(family: str):
    """``task_configs/<family>/utils.py``, loaded by path as lm-eval loads a task's utils."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", family, "utils.py")
    spec = importlib.util.spec_from_file_location(f"lmeval_dllm_task_{family}_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_runner = _sibling("humaneval")  # the process runner of humaneval_instruct_dllm
DEFAULT_TIMEOUT_S = _runner.DEFAULT_TIMEOUT_S
# Fast-dLLM packs the few-shot text into one user turn (task_configs/gsm8k/utils.py has the layout classes).
OneTurnFewshotTask = _sibling("gsm8k").OneTurnFewshotTask


# --------------------------------------------------------------------------------------------------------------
# Data


def load_mbpp(mbpp_path: Optional[str] = None, **_metadata: Any) -> datasets.DatasetDict:
    """Sanitized MBPP's ``test`` (257 problems) and ``prompt`` (the few-shot exemplars) splits.

    Only ``mbpp_path`` is read: a directory with ``test`` and ``prompt`` as ``.jsonl`` / ``.json`` / ``.parquet``
    (also a hub snapshot's ``sanitized/test-00000-of-00001.parquet``), or the original release's single
    ``sanitized-mbpp.json`` (split by task id as the hub does: ids 1-10 are ``prompt``, 11-510 ``test``). The
    full set's ``text`` field is accepted for ``prompt``. Without a path: ``google-research-datasets/mbpp``,
    config ``sanitized``, from the hub. Rows of the ``prompt`` split get ``is_fewshot: True`` (the exemplars'
    target is their code), the others ``False``.
    """
    if not mbpp_path:
        split_rows = {s: datasets.load_dataset(HUB_PATH, HUB_NAME, split=s).to_list() for s in SPLITS}
        return _dataset_dict(split_rows, HUB_PATH)
    if os.path.isfile(mbpp_path):
        rows = _rows(mbpp_path)
        split_rows = {"prompt": [r for r in rows if 1 <= r["task_id"] <= 10],
                      "test": [r for r in rows if 11 <= r["task_id"] <= 510]}
    elif os.path.isdir(mbpp_path):
        split_rows = {s: _rows(_find(mbpp_path, s)) for s in SPLITS}
    else:
        raise FileNotFoundError(f"mbpp_path={mbpp_path!r} is neither a file nor a directory")
    return _dataset_dict(split_rows, mbpp_path)


def _dataset_dict(split_rows: dict, source: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list([{**row, "is_fewshot": split == "prompt"}
                                           for row in _normalise(rows, source)])
        for split, rows in split_rows.items()})


def _find(directory: str, split: str) -> str:
    for sub in ("", HUB_NAME):
        for ext in (".jsonl", ".json", ".parquet"):
            if os.path.isfile(os.path.join(directory, sub, split + ext)):
                return os.path.join(directory, sub, split + ext)
        parquet = sorted(glob.glob(os.path.join(directory, sub, f"{split}-*.parquet")))
        if parquet:
            return parquet[0]
    raise FileNotFoundError(f"no {split}.jsonl / {split}.json / {split}*.parquet under mbpp_path={directory!r}")


def _rows(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path).to_list()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)


def _normalise(rows: list[dict], path: str) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row)
        if "prompt" not in row and "text" in row:  # the full set names the task "text"
            row["prompt"] = row["text"]
        row.setdefault("test_imports", [])
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: expected MBPP problems with fields {FIELDS}; missing {missing}")
        out.append({k: row[k] for k in FIELDS})
    if not out:
        raise ValueError(f"{path}: no MBPP problems")
    return out


# --------------------------------------------------------------------------------------------------------------
# Prompts (lm-eval's mbpp / mbpp_instruct wording over the sanitized fields)


def _tests(doc: dict) -> str:
    return "\n".join(doc["test_list"])


def fewshot_prompt(doc: dict) -> str:
    return (f"You are an expert Python programmer, and here is your task: {doc['prompt']} Your code should pass "
            f"these tests:\n\n{_tests(doc)}\n[BEGIN]\n")


def fewshot_target(doc: dict) -> str:
    """An exemplar's answer (its code, then "[DONE]"); for a test problem the asserts (what is scored)."""
    return doc["code"] + "\n[DONE]" if doc.get("is_fewshot") else _tests(doc)


def instruct_target(doc: dict) -> str:
    """An exemplar's answer (its code, then the closing fence, after the gen_prefix's opening one)."""
    return doc["code"] + "\n```" if doc.get("is_fewshot") else _tests(doc)


def instruct_prompt(doc: dict) -> str:
    return (f"You are an expert Python programmer, and here is your task:\n{doc['prompt']}\nYour code should pass "
            f"these tests:\n{_tests(doc)}")


# --------------------------------------------------------------------------------------------------------------
# Code extraction

_FENCE_RE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|$)", re.DOTALL)


def fewshot_code(response: str) -> str:
    """The code of a 3-shot answer: the text up to "[DONE]" (the stop string; cut here too when a model writes it
    mid-answer), without a stray "[BEGIN]" or markdown fence around it."""
    code = response.split("[DONE]")[0]
    code = code.split("[BEGIN]")[-1]
    if "```" in code:
        blocks = _FENCE_RE.findall(code)
        code = next((b for b in blocks if b.strip()), "")
    return code


def instruct_code(response: str) -> str:
    """The code of an instruct answer, which continues the python fence the assistant turn opened: the text before
    the closing fence; when the answer starts with prose instead, the first fenced block after it (lm-eval's
    ``mbpp_instruct`` extraction, which also takes the first block)."""
    head, fence, rest = response.partition("```")
    if not fence or head.strip() and _is_python(head):
        return head
    blocks = [b for b in _FENCE_RE.findall(fence + rest) if b.strip()]
    return blocks[0] if blocks else ""


def _is_python(text: str) -> bool:
    import ast

    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def program(code: str, doc: dict) -> str:
    """The problem's imports, the model's code, then the problem's asserts."""
    imports = "\n".join(doc.get("test_imports") or [])
    return f"{imports}\n{code}\n\n{_tests(doc)}\n"


def build_fewshot_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[fewshot_code(r) for r in rs] for rs in resps]


def build_instruct_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[instruct_code(r) for r in rs] for rs in resps]


def process_results(doc: dict, results: list[str], timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, float]:
    """``pass_at_1``: 1.0 when the code (``results[0]``, already extracted by the task's filter) passes every assert
    of the problem, in a fresh process with the runner's time and memory limits; else 0.0."""
    status = _runner.run_program(program(results[0], doc) + _runner._PASSED_FOOTER, timeout=timeout)
    return {"pass_at_1": float(status == _runner._PASSED_EXIT_CODE)}
