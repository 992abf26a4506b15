"""dInfer's vicinity refresh (lmeval_dllm/caches/vicinity.py): which columns run at each step (warm-up, block
starts, the window), the settings that make it exact (a window over the whole canvas, a warm-up over the whole
call, refresh every step) or the dual cache (no look, no warm-up), and a batch = each prompt alone when rows leave
their warm-up at different steps."""

from __future__ import annotations

import pytest
import torch
from caches_support import PROMPTS, decode, left_pad, tiny

from lmeval_dllm.caches import CACHES, build_cache, check_compatible
from lmeval_dllm.samplers import SAMPLERS


def logged(model, ids, mask, **cache_kw):
    """Run vanilla (threshold mode: rows need different step counts) through vicinity; return the output and, per
    step, the key slots layer 0 wrote (the columns run) and the block."""
    cache = build_cache("vicinity", **cache_kw)
    runs = []
    update = cache.update

    def logging_update(layer_idx, input_pos, k, v):
        if layer_idx == 0:
            runs.append(input_pos.tolist())
        return update(layer_idx, input_pos, k, v)

    cache.update = logging_update
    blocks = []
    out = decode(model, ids, mask, cache, gen_length=16, block_length=4, threshold=0.05,
                 on_step=lambda lg, st: blocks.append((st.block.start, st.block.stop, st.step_in_block)))
    return out, runs, blocks


def test_warm_up_then_block_starts_run_the_canvas_and_other_steps_the_window(llada_dir):
    model, tok = tiny(llada_dir)
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=False).input_ids])
    T = ids.shape[1] + 16
    out, runs, blocks = logged(model, ids, None, prefix_look=2, after_look=3, warmup_steps=3)
    assert len(runs) == len(blocks) == out.steps
    for n, (cols, (start, stop, step_in_block)) in enumerate(zip(runs, blocks)):
        if n <= 3 or step_in_block == 0:
            assert cols == list(range(T)), n  # warm-up pass, the first fill after it, or the block's refresh
        else:
            assert cols == list(range(max(start - 2, 0), min(stop + 3, T))), n
    assert any(step_in_block > 0 and n >= 3 for n, (_, _, step_in_block) in enumerate(blocks))  # a cached step


def test_the_first_pass_after_the_warm_up_refreshes_inside_a_block(llada_dir):
    model, tok = tiny(llada_dir)
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=False).input_ids])
    T = ids.shape[1] + 16
    # block 0 takes 4 steps with one token per step: passes 0, 1 warm up, 2 fills the cache, 3 runs the window
    cache = build_cache("vicinity", prefix_look=1, after_look=1, warmup_steps=2)
    runs = []
    update = cache.update
    cache.update = lambda i, p, k, v: (runs.append(p.tolist()) if i == 0 else None, update(i, p, k, v))[1]
    decode(model, ids, None, cache, gen_length=16, block_length=4, num_transfer_tokens=1)
    P = ids.shape[1]
    assert runs[:4] == [list(range(T))] * 3 + [list(range(P - 1, P + 5))]


@pytest.mark.parametrize("kw", [
    {"prefix_look": 64, "after_look": 64},  # the window is the whole canvas
    {"warmup_steps": 64},  # the warm-up never ends
    {"prefix_look": 2, "after_look": 2, "warmup_steps": 2, "refresh_interval": 1},
])
def test_exact_settings_equal_no_cache(tiny_dir, kw):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    ref = decode(model, ids, mask, None, gen_length=16, block_length=4, threshold=0.05)
    out = decode(model, ids, mask, ("vicinity", kw), gen_length=16, block_length=4, threshold=0.05)
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert out.nfe.tolist() == ref.nfe.tolist()


def test_no_look_and_no_warm_up_is_the_dual_cache(tiny_dir):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    dual = decode(model, ids, mask, ("dual", {}), gen_length=16, block_length=4, threshold=0.05)
    out = decode(model, ids, mask, ("vicinity", {}), gen_length=16, block_length=4, threshold=0.05)
    assert out.tokens.tolist() == dual.tokens.tolist()
    assert out.nfe.tolist() == dual.nfe.tolist()


@pytest.mark.parametrize("kw", [{"prefix_look": 2, "after_look": 2}, {"prefix_look": 1, "after_look": 3,
                                                                      "warmup_steps": 3}])
@pytest.mark.parametrize("mode", [{"threshold": 0.05}, {"num_transfer_tokens": 2}, {"factor": 3.0}])
def test_batch_equals_each_prompt_alone(tiny_dir, kw, mode):
    """Rows need different step counts per block, so with a warm-up they leave it at different steps of the
    batch: the step where some rows warm up runs the canvas with the other rows' K/V taken from the cache outside
    their window."""
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    batch = decode(model, ids, mask, ("vicinity", kw), gen_length=16, block_length=4, **mode)
    assert (batch.tokens != model.mask_token_id).all()
    for i, e in enumerate(enc):
        alone = decode(model, torch.tensor([e]), None, ("vicinity", kw), gen_length=16, block_length=4, **mode)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), (i, PROMPTS[i])
        assert alone.nfe[0] == batch.nfe[i]


def test_composition_with_every_strategy():
    """Every strategy runs with vicinity except DAEDAL, refused before any model work with the reason."""
    for name, strategy in SAMPLERS.items():
        if name == "daedal":
            with pytest.raises(ValueError, match=r"strategy 'daedal' cannot be used with cache='vicinity': the "
                                                 r"strategy changes the canvas length while decoding .*, and "
                                                 r"vicinity counts each row's warm-up"):
                check_compatible(strategy, CACHES["vicinity"])
        else:
            check_compatible(strategy, CACHES["vicinity"])


@pytest.mark.parametrize("kw,msg", [
    ({"prefix_look": -1}, "prefix_look must be an integer >= 0, got -1"),
    ({"warmup_steps": -2}, "warmup_steps must be an integer >= 0, got -2"),
    ({"refresh_interval": 0}, "refresh_interval must be an integer >= 1"),
    ({"prefix_lok": 1}, "unknown parameter 'prefix_lok' for cache 'vicinity'; did you mean 'prefix_look'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        build_cache("vicinity", **kw)


def test_wino_runs_its_shadow_block_through_vicinity(tiny_dir):
    """WINO's extra rows go through the window (and the warm-up's mixed steps): refresh every step = no cache, and a
    batch = each prompt alone."""
    from lmeval_dllm.generate import GenerationConfig, generate
    from lmeval_dllm.samplers import Proposal, build_sampler

    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)

    def run(ids, mask, kw):
        sampler = build_sampler("wino", Proposal.from_params(), wide_in_thres=0.05, narrow_out_thres=0.02)
        cache = build_cache("vicinity", **kw) if kw is not None else None
        return generate(model, ids, mask, sampler, GenerationConfig(16, 8), stop_token_ids=torch.tensor([999]),
                        cache=cache)

    ref = run(ids, mask, None)
    exact = run(ids, mask, {"prefix_look": 2, "after_look": 2, "warmup_steps": 2, "refresh_interval": 1})
    assert exact.tokens.tolist() == ref.tokens.tolist() and exact.nfe.tolist() == ref.nfe.tolist()
    kw = {"prefix_look": 2, "after_look": 2, "warmup_steps": 2}
    batch = run(ids, mask, kw)
    for i, e in enumerate(enc):
        alone = run(torch.tensor([e]), None, kw)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), i
        assert alone.nfe[0] == batch.nfe[i]
