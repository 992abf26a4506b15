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


@pytest.mark.parametrize("rope", [kernels.rope_fp32, kernels.rope_native, kernels.norm_rope_fp32,
                                  kernels.norm_rope_native])
def test_the_storing_rope_writes_what_rope_and_two_index_copies_write(rope):
    """kernels.storing(rope): the function the fused kernel compiles equals RoPE, then K and V copied into the
    stores at the slots (the other slots untouched)."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Q, S, Dh = 2, 4, 2, 3, 7, 8
    q, k, v = (torch.randn(B, H, Q, Dh, generator=g, dtype=torch.bfloat16) for H in (Hq, Hkv, Hkv))
    cos, sin = torch.randn(B, 1, Q, Dh, generator=g), torch.randn(B, 1, Q, Dh, generator=g)
    norm_w = torch.randn(2, Dh, generator=g).to(torch.bfloat16)  # the model's weights, in its dtype
    args = (norm_w[0], norm_w[1], 1e-6, cos, sin) \
        if rope in (kernels.norm_rope_fp32, kernels.norm_rope_native) else (cos, sin)
    slots = torch.tensor([5, 1, 2])
    K0, V0 = torch.randn(B, Hkv, S, Dh, generator=g), torch.randn(B, Hkv, S, Dh, generator=g)
    K, V = K0.to(torch.bfloat16), V0.to(torch.bfloat16)
    want_q, want_k = rope(q, k, *args)
    want_K, want_V = K.clone().index_copy_(2, slots, want_k), V.clone().index_copy_(2, slots, v)
    out = kernels.storing(rope)(q, k, v, K, V, slots, *args)
    assert torch.equal(out, want_q) and torch.equal(K, want_K) and torch.equal(V, want_V)
    assert kernels.storing(rope) is kernels.storing(rope)  # one function per stage: one compilation
    assert kernels.storing(rope).__name__ == f"{rope.__name__}_store"


CPU_STORES = [("llada", "dual", {}), ("dream", "dual", {}), ("llada", "prefix", {}),
              ("llada", "sparse", {}), ("dream", "vicinity", {"prefix_look": 2, "after_look": 2, "warmup_steps": 1}),
              ("dream", "dual", {"refresh_interval": 2}), ("sdar", "block", {}), ("fast_dllm_v2", "block", {}),
              ("fast_dllm_v2", "dual", {})]


@pytest.mark.parametrize("family, cache_name, kw", CPU_STORES)
def test_keys_written_by_the_rope_kernel_decode_as_update_does(monkeypatch, tmp_path, llada_dir, dream_dir,
                                                                family, cache_name, kw):
    """The GPU's fused path, forced on the CPU: the layers write K/V through ``kv_slots`` and
    ``kernels.storing`` instead of calling ``cache.update``; tokens and NFE are those of ``update`` (which is
    not called at all when the cache offers its stores)."""
    from caches_support import tiny

    from lmeval_dllm.caches import build_cache
    from lmeval_dllm.generate import GenerationConfig, generate
    from lmeval_dllm.models.transformer import Block
    from lmeval_dllm.samplers import Proposal, build_sampler

    if family in ("llada", "dream"):
        model, _ = tiny(llada_dir if family == "llada" else dream_dir)
    else:  # block diffusion (qk-norm RoPE for SDAR, the token shift for Fast-dLLM v2)
        from lmeval_dllm.models import load_model
        from lmeval_dllm.tiny import write_checkpoint

        model = load_model(write_checkpoint(str(tmp_path), family, seed=4))
    prompt = torch.tensor([[5, 9, 13, 2, 7, 11], [3, 3, 8, 1, 4, 6]])
    config = GenerationConfig(gen_length=16, block_length=min(8, model.block_size or 8))

    def decode():
        cache = build_cache(cache_name, **kw)
        sampler = build_sampler("vanilla", Proposal.from_params(), num_transfer_tokens=2)
        out = generate(model, prompt, None, sampler, config, stop_token_ids=torch.tensor([-1]), cache=cache)
        return out.tokens.tolist(), out.nfe.tolist()

    want = decode()
    updates, stored = [], []  # calls of update; per layer pass with the cache: did it take the stores
    real_update = {}

    def kv_stores(self, cache, input_pos, h):  # the CUDA condition dropped
        if cache is None:  # a pass without the cache (a full step of some caches)
            return None
        stores = cache.kv_slots(self.layer_idx, input_pos)
        stored.append(stores is not None)
        return stores

    monkeypatch.setattr(Block, "kv_stores", kv_stores)
    from lmeval_dllm.caches import CACHES

    cls = CACHES[cache_name]
    real_update[cls] = cls.update
    monkeypatch.setattr(cls, "update", lambda self, *a: (updates.append(1), real_update[cls](self, *a))[1])
    assert decode() == want
    assert any(stored)  # the cached steps took the fused path
    assert len(updates) == stored.count(False)  # and only the others called update
