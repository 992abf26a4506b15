"""Shared fixtures: tiny random checkpoints in the official LLaDA / Dream layouts (built once per session,
loaded through the real loader), lm-eval's offline switches, and one intra-op thread for the whole session (the
tests run thousands of tiny decodes: one thread is faster than two fighting for shared cores)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory) -> str:
    from lmeval_dllm.tiny import write_checkpoint

    return write_checkpoint(str(tmp_path_factory.mktemp("tiny-llada")), "llada", seed=0)


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory) -> str:
    from lmeval_dllm.tiny import write_checkpoint

    return write_checkpoint(str(tmp_path_factory.mktemp("tiny-dream")), "dream", seed=0)


@pytest.fixture(scope="session", params=["llada", "dream"])
def tiny_dir(request, llada_dir, dream_dir) -> str:
    """Each test using this runs once per model family."""
    return llada_dir if request.param == "llada" else dream_dir
