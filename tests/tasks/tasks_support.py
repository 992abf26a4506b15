"""Paths and loaders shared by the task-config tests (a plain module: test files import it, not conftest)."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TASK_CONFIGS = os.path.join(REPO, "task_configs")
DATA = os.path.join(os.path.dirname(__file__), "data")
GSM8K_MINI = os.path.join(DATA, "gsm8k_mini")
POEM_MINI = os.path.join(DATA, "poem_mini.json")
# Same place as tests/conftest.py's SHARED_DATA (conftest modules are not imported from one another).
SHARED_POEMS = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "reversal_poem", "poem_data.json"))


def load_utils(family: str) -> ModuleType:
    """``task_configs/<family>/utils.py`` as a module (the same file lm-eval's ``!function`` loads)."""
    path = os.path.join(TASK_CONFIGS, family, "utils.py")
    spec = importlib.util.spec_from_file_location(f"task_utils_{family}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tasks(names: list[str], **metadata) -> dict:
    """lm-eval task objects, built from our YAMLs as ``--include_path task_configs`` builds them (lm-eval's own
    tasks are left out of the index: ours use none of them, and indexing them costs seconds)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASK_CONFIGS, include_defaults=False, metadata=metadata)
    loaded = manager.load(names)
    return loaded["tasks"]
