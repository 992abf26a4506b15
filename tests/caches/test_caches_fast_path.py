"""The fast path's fallbacks, on the CPU: CUDA graphs and fused kernels only apply on CUDA (where the benchmark's
``--check`` compares them with the plain path); elsewhere, and when fusion fails, the plain code runs."""

from __future__ import annotations

import pytest
import torch

from lmeval_dllm.caches.graphs import StepGraphs
from lmeval_dllm.models import common


def test_graphs_call_the_function_on_the_cpu():
    graphs, calls = StepGraphs(), []
    out = graphs.run("key", lambda x: (calls.append(1), x + 1)[1], torch.ones(2))
    graphs.run("key", lambda x: (calls.append(1), x + 1)[1], torch.ones(2))
    assert out.tolist() == [2.0, 2.0] and len(calls) == 2 and len(graphs) == 0


def test_elementwise_stages_are_plain_on_the_cpu():
    x = torch.randn(3, 4)
    assert common.kernel(common.rms_norm, x) is common.rms_norm


def test_a_stage_that_cannot_be_fused_runs_plain_with_a_warning():
    def data_dependent(x):  # a host read inside: not capturable as one graph
        return x * 2 if x.sum().item() > 0 else x

    fused = common._Fused(data_dependent)
    with pytest.warns(UserWarning, match=r"^fusing data_dependent failed \("):
        out = fused(torch.ones(3))
    assert out.tolist() == [2.0, 2.0, 2.0] and fused.failed
    assert fused(-torch.ones(2)).tolist() == [-1.0, -1.0]  # no second attempt, no second warning
