"""How strategies meet caches: the compatibility rule (and its messages), parameter routing in the lm-eval model,
rows outside the canvas (WINO's shadow block) through ``ExtraRows``, and a canvas that grows (DAEDAL)."""

from __future__ import annotations

from typing import ClassVar, Optional

import pytest
import torch
from caches_support import EXACT, PROMPTS, decode, left_pad, tiny

from lmeval_dllm.caches import CACHES, ExtraRows, build_cache, check_compatible
from lmeval_dllm.state import StepLogits
from lmeval_dllm.samplers import SAMPLERS
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler

# caches of bidirectional models (cache=block serves block-causal ones: tests/caches/test_caches_block.py)
BIDIRECTIONAL = [name for name in CACHES if not CACHES[name].needs_block_causal]


class ShadowSampler(LowConfidenceSampler):
    """WINO-like: runs a leave-one-out copy of the block (mask tokens at the block's positions; shadow i sees every
    canvas key except block column i, and every shadow key) through ``ExtraRows``; decodes with the main logits."""

    name = "shadow"
    cache_needs: ClassVar[frozenset[str]] = frozenset({"extra_rows"})

    def forward(self, model, cache, state, span):
        B, T = state.x.shape
        L = span.stop - span.start
        sees = torch.ones(B, L, T + L, dtype=torch.bool)
        if state.attention_mask is not None:
            sees[:, :, :T] &= state.attention_mask[:, None, :]
        sees[:, torch.arange(L), span.start + torch.arange(L)] = False
        extra = ExtraRows(ids=torch.full((B, L), state.mask_token_id), position_ids=state.position_ids[:, span],
                          sees=sees)
        out = cache.forward(model, state, span, extra=extra)
        state.sampler_state.setdefault("shadow", []).append(out.logits[:, L:].clone())
        return StepLogits(out.logits[:, :L], out.fresh)


class GrowingSampler(LowConfidenceSampler):
    name = "grows"
    cache_needs: ClassVar[frozenset[str]] = frozenset({"resize"})


class SigmaSampler(LowConfidenceSampler):
    name = "with_sigma"

    def __init__(self, proposal, *, sigma: Optional[float] = None):
        super().__init__(proposal)
        self.sigma = sigma


class NoSigmaSampler(LowConfidenceSampler):
    name = "without_sigma"

    def __init__(self, proposal, *, num_transfer_tokens: Optional[int] = None):
        super().__init__(proposal, num_transfer_tokens=num_transfer_tokens)


@pytest.mark.parametrize("cache", ["dllm", "d2cache"])
def test_extra_rows_need_a_cache_that_runs_them(cache):
    with pytest.raises(ValueError) as e:
        check_compatible(ShadowSampler, CACHES[cache])
    reason = {"dllm": "the dllm cache keeps per-position features of canvas rows only",
              "d2cache": "d2cache chooses its own query rows among canvas positions and cannot add rows outside it"}
    assert str(e.value) == (
        f"strategy 'shadow' cannot be used with cache={cache!r}: the strategy runs rows that are not part of the "
        f"canvas alongside it (WINO's leave-one-out shadow block), and {reason[cache]}. Use a cache that supports "
        f"it (cache=none, prefix or dual).")


@pytest.mark.parametrize("cache", ["dllm", "d2cache"])
def test_a_growing_canvas_needs_a_cache_that_follows(cache):
    with pytest.raises(ValueError, match=r"^strategy 'grows' cannot be used with cache=.*changes the canvas length "
                                         r"while decoding \(DAEDAL inserts masks\), and .*stored by canvas position"):
        check_compatible(GrowingSampler, CACHES[cache])


def test_supported_combinations_pass():
    for sampler in (ShadowSampler, GrowingSampler, LowConfidenceSampler):
        for cache in ("prefix", "dual"):
            check_compatible(sampler, CACHES[cache])
    for cache in CACHES:
        check_compatible(LowConfidenceSampler, CACHES[cache])


def test_unknown_need_is_an_error():
    class Odd(LowConfidenceSampler):
        name = "odd"
        cache_needs = frozenset({"telepathy"})

    with pytest.raises(ValueError, match=r"^strategy 'odd' declares an unknown cache need 'telepathy'; known: "
                                         r"extra_rows, resize, decoded_logits$"):
        check_compatible(Odd, CACHES["prefix"])


def test_lm_eval_model_rejects_the_combination_before_loading(monkeypatch, llada_dir):
    from lmeval_dllm.lm import DLLM

    monkeypatch.setitem(SAMPLERS, "shadow", ShadowSampler)
    with pytest.raises(ValueError, match=r"^strategy 'shadow' cannot be used with cache='dllm'"):
        DLLM(pretrained="/nonexistent/checkpoint", strategy="shadow", cache="dllm")
    model = DLLM(pretrained=llada_dir, strategy="shadow", cache="dual", refresh_interval=2)
    assert model.cache.name == "dual" and model.cache.refresh_interval == 2


def test_a_name_both_take_goes_to_both(monkeypatch, llada_dir):
    from lmeval_dllm.lm import DLLM

    monkeypatch.setitem(SAMPLERS, "without_sigma", NoSigmaSampler)
    model = DLLM(pretrained=llada_dir, strategy="without_sigma", cache="d2cache", sigma=5.0, current_k=4)
    assert (model.cache.sigma, model.cache.current_k) == (5.0, 4) and "sigma" not in model.user_decoding
    model = DLLM(pretrained=llada_dir, cache="d2cache", sigma=5.0)  # vanilla takes sigma (the certainty prior) too
    assert model.cache.sigma == 5.0 and model.user_decoding["sigma"] == 5.0
    monkeypatch.setitem(SAMPLERS, "with_sigma", SigmaSampler)
    model = DLLM(pretrained=llada_dir, strategy="with_sigma", cache="d2cache", sigma=5.0)
    assert model.cache.sigma == 5.0 and model.user_decoding["sigma"] == 5.0
    model = DLLM(pretrained=llada_dir, strategy="with_sigma", sigma=3.0)  # no cache: the strategy's alone
    assert model.user_decoding["sigma"] == 3.0


def _shadow_run(model, ids, mask, cache):
    sampler = ShadowSampler(__import__("lmeval_dllm.samplers", fromlist=["Proposal"]).Proposal(),
                            num_transfer_tokens=2)
    from lmeval_dllm.generate import GenerationConfig, generate

    seen = []
    step = sampler.step
    sampler.step = lambda logits, state: (seen.append(state.sampler_state), step(logits, state))[1]
    out = generate(model, ids, mask, sampler, GenerationConfig(16, 8), stop_token_ids=torch.tensor([999]),
                   cache=build_cache(cache[0], **cache[1]) if cache else None)
    return out, seen[-1]["shadow"]


@pytest.mark.parametrize("name", ["prefix", "dual"])
def test_extra_rows_through_prefix_and_dual(llada_dir, name):
    """Refreshed at every step, the shadow rows' logits through the cache equal those without one; in the cached
    mode they run and decoding completes."""
    model, tok = tiny(llada_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    ref, ref_shadow = _shadow_run(model, ids, mask, None)
    out, shadow = _shadow_run(model, ids, mask, (name, {"refresh_interval": 1}))
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(shadow, ref_shadow)) < 1e-5
    out, shadow = _shadow_run(model, ids, mask, (name, {}))
    assert (out.tokens != model.mask_token_id).all() and len(shadow) == out.steps
    assert shadow[1].shape == (2, 8, model.args.vocab_size) and torch.isfinite(shadow[1]).all()


@pytest.mark.parametrize("name, keeps", [("prefix", True), ("dual", False)])
def test_a_growing_canvas(llada_dir, name, keeps):
    """Two masks inserted in the current block: the prefix cache keeps the K/V left of the block and reruns the
    (longer) block and suffix; the dual cache, whose cached suffix keys moved, reruns everything."""
    from lmeval_dllm.state import DecodeState

    model, tok = tiny(llada_dir)
    enc, _, _ = left_pad(tok, PROMPTS[:1])
    P, G = len(enc[0]), 16
    x = torch.cat([torch.tensor(enc), torch.full((1, G), model.mask_token_id)], 1)
    state = DecodeState(x=x, position_ids=torch.arange(P + G)[None], attention_mask=None, prompt_len=P,
                        mask_token_id=model.mask_token_id, stop_token_ids=torch.tensor([999]),
                        block=slice(P + 8, P + 16), active=torch.ones(1, dtype=torch.bool))
    cache = build_cache(name)
    cache.setup(model, state)
    cache.forward(model, state, state.block)
    kept = cache.k[..., :P + 8, :].clone()
    rows = []
    hook = model.tok_embeddings.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
    try:
        state.x = torch.cat([x[:, :P + 10], torch.full((1, 2), model.mask_token_id), x[:, P + 10:]], 1)
        state.position_ids = torch.arange(P + G + 2)[None]
        state.block, state.step_in_block = slice(P + 8, P + 18), 1
        logits = cache.forward(model, state, state.block).logits
    finally:
        hook.remove()
    assert logits.shape == (1, 10, model.args.vocab_size)
    assert rows == ([P + G + 2 - (P + 8)] if keeps else [P + G + 2])
    assert torch.equal(cache.k[..., :P + 8, :], kept) == keeps


def test_prefix_and_dual_parameters_are_checked():
    for name in ("prefix", "dual"):
        with pytest.raises(ValueError, match=r"^refresh_interval must be an integer >= 1 \(or None\), got 0$"):
            build_cache(name, refresh_interval=0)
    assert build_cache("prefix").refresh_interval is None


def test_vanilla_modes_run_with_every_cache(tiny_dir):
    """Every cache with every vanilla mode completes the generation (no mask left, each position committed once,
    NFE as the mode implies); refreshed at every step it is the no-cache decode; a threshold no confidence reaches
    is one token per step through the same cache."""
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    modes = [{"num_transfer_tokens": 2}, {"steps": 8}, {"threshold": 0.5}, {"factor": 2.0},
             {"num_transfer_tokens": 1, "threshold": 0.9}]
    for mode in modes:
        ref = decode(model, ids, mask, None, gen_length=16, block_length=8, **mode)
        for name in BIDIRECTIONAL:
            out = decode(model, ids, mask, (name, {}), gen_length=16, block_length=8, **mode)
            assert (out.tokens != model.mask_token_id).all(), (name, mode)
            assert out.committed.tolist() == [16, 16], (name, mode)
            if len(mode) == 1 and ("num_transfer_tokens" in mode or "steps" in mode) and name != "d2cache":
                assert out.nfe.tolist() == [8, 8], (name, mode)
            exact = decode(model, ids, mask, (name, EXACT[name]), gen_length=16, block_length=8, **mode)
            assert exact.tokens.tolist() == ref.tokens.tolist(), (name, mode)
            assert exact.nfe.tolist() == ref.nfe.tolist(), (name, mode)
    for name in BIDIRECTIONAL:
        top1 = decode(model, ids, mask, (name, {}), gen_length=16, block_length=8, num_transfer_tokens=1)
        unreachable = decode(model, ids, mask, (name, {}), gen_length=16, block_length=8, threshold=1.0)
        assert unreachable.tokens.tolist() == top1.tokens.tolist(), name
        assert unreachable.decoded_at.tolist() == top1.decoded_at.tolist(), name
        if name != "d2cache":
            assert top1.nfe.tolist() == [16, 16], name
