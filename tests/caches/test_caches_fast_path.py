"""The fast path's fallbacks, on the CPU: CUDA graphs and fused kernels only apply on CUDA (where the benchmark's
``--check`` compares them with the plain path); elsewhere, and when fusion fails, the plain code runs."""

from __future__ import annotations

import pytest
import torch

from lmeval_dllm.caches.graphs import StepGraphs
from lmeval_dllm.models import kernels
from lmeval_dllm.params import coerce_kwargs


def test_graphs_call_the_function_on_the_cpu():
    graphs, calls = StepGraphs(), []
    out = graphs.run("key", lambda x: (calls.append(1), x + 1)[1], torch.ones(2))
    graphs.run("key", lambda x: (calls.append(1), x + 1)[1], torch.ones(2))
    assert out.tolist() == [2.0, 2.0] and len(calls) == 2 and len(graphs) == 0


def test_elementwise_stages_are_plain_on_the_cpu():
    x = torch.randn(3, 4)
    assert kernels.kernel(kernels.rms_norm, x) is kernels.rms_norm


def test_a_stage_that_cannot_be_fused_runs_plain_with_a_warning():
    def data_dependent(x):  # a host read inside: not capturable as one graph
        return x * 2 if x.sum().item() > 0 else x

    fused = kernels._Fused(data_dependent)
    with pytest.warns(UserWarning, match=r"^fusing data_dependent failed \("):
        out = fused(torch.ones(3))
    assert out.tolist() == [2.0, 2.0, 2.0] and fused.failed
    assert fused(-torch.ones(2)).tolist() == [-1.0, -1.0]  # no second attempt, no second warning


def _failing(error):
    class Compiled:
        def __call__(self, *args):
            raise error

    fused = kernels._Fused(lambda x: x + 1)
    fused.compiled = Compiled()
    return fused


def test_out_of_memory_inside_a_fused_stage_reaches_the_caller():
    """The OOM batch split in lm.py must see a CUDA out-of-memory error: fusion stays on, nothing is swallowed."""
    fused = _failing(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="^CUDA out of memory"):
        fused(torch.ones(2, 3))
    assert not fused.failed


def test_a_runtime_error_inside_a_fused_stage_is_not_a_compile_failure():
    fused = _failing(RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access"):
        fused(torch.ones(2, 3))
    assert not fused.failed


def test_a_compile_error_turns_fusion_off_with_one_warning():
    from torch._dynamo.exc import BackendCompilerFailed

    fused = _failing(BackendCompilerFailed(lambda *a: None, RuntimeError("no C compiler"), None))
    with pytest.warns(UserWarning, match=r"^fusing <lambda> failed \(BackendCompilerFailed"):
        assert fused(torch.ones(2)).tolist() == [2.0, 2.0]
    assert fused.failed


def test_fusion_is_a_constructor_option_of_the_model():
    from lmeval_dllm.models import DiffusionLM, ModelArgs

    args = ModelArgs(family="llada", dim=8, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=16, vocab_size=16,
                     rope_theta=1e4, norm_eps=1e-5, qkv_bias=False, rope_fp32=True, tie_embeddings=False,
                     max_position=64, mask_token_id=15, eos_token_id=14, pad_token_id=14, logit_shift=0)
    plain, fused = DiffusionLM(args, fuse=False), DiffusionLM(args)
    assert [m.fuse for m in plain.modules() if hasattr(m, "fuse")] == [False] * 5  # model, 2 norms + block, final
    assert all(m.fuse for m in fused.modules() if hasattr(m, "fuse"))


def test_graphs_are_a_constructor_option_of_every_cache():
    from lmeval_dllm.caches import CACHES, Cache, build_cache, cache_params

    for name in ["none", *CACHES]:
        cache = build_cache(name, cuda_graphs=False)
        assert not cache.graphs.enabled and not getattr(cache, "block_graphs", cache.graphs).enabled
        assert "cuda_graphs" not in cache_params(name)
        assert build_cache(name).graphs.enabled
    assert type(build_cache(None)) is Cache
    # an engine option is not a method parameter: given as one (a matrix's cache params), it is unknown
    with pytest.raises(ValueError, match=r"^unknown parameter 'cuda_graphs' for cache 'dual' accepted: "
                                         r"refresh_interval$"):
        coerce_kwargs(CACHES["dual"].__init__, {"cuda_graphs": False}, "cache 'dual'", cache_params("dual"))


def test_step_graphs_are_bounded():
    graphs = StepGraphs(capacity=2)
    graphs._graphs.update({"a": None})  # as if one shape had been captured (the CPU never captures)
    graphs._admit()
    assert list(graphs._graphs) == ["a"]
    graphs._graphs["b"] = None
    graphs._admit()  # a third shape: the set is dropped before it is captured
    assert len(graphs) == 0
    with pytest.raises(ValueError, match=r"^capacity must be an integer >= 1, got 0$"):
        StepGraphs(capacity=0)


def test_no_cache_drops_its_graphs_when_the_canvas_shape_changes(llada_dir):
    """The no-cache path keeps the graphs of one canvas shape only (they once piled up, one per prompt length)."""
    from caches_support import tiny

    from lmeval_dllm.caches import Cache
    from lmeval_dllm.state import DecodeState

    model, _ = tiny(llada_dir)

    def state(T):
        x = torch.full((2, T), model.mask_token_id)
        return DecodeState(x=x, position_ids=torch.arange(T).expand(2, -1), attention_mask=None, prompt_len=4,
                           mask_token_id=model.mask_token_id, stop_token_ids=torch.tensor([1]))

    cache = Cache()
    cache.setup(model, state(20))
    cache.graphs._graphs["full-20"] = None  # stands for a captured graph (the CPU never captures)
    cache.setup(model, state(20))
    assert list(cache.graphs._graphs) == ["full-20"]  # same shape: kept for the next batch
    cache.setup(model, state(21))
    assert len(cache.graphs) == 0
