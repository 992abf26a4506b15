"""Sparse-dLLM (lmeval_dllm/caches/sparse.py): the eviction on hand-built queries and keys (top scores, pooling,
ties, padding), the step schedule (delay, selection pass, block steps over the kept K/V), the storage it holds,
the settings that make it exact (no cache) or the dual cache, and its parameter and strategy checks."""

from __future__ import annotations

import pytest
import torch
from caches_support import PROMPTS, decode, decode_logged, left_pad, tiny

from lmeval_dllm.caches import CACHES, build_cache, check_compatible
from lmeval_dllm.caches.sparse import salient_columns
from lmeval_dllm.samplers import SAMPLERS


def hand_built(importance):
    """q (1, 1, 1, 2), k (1, 1, T, 2) whose scores q . k_j are exactly ``importance`` (one head, one block row)."""
    k = torch.zeros(1, 1, len(importance), 2)
    k[0, 0, :, 0] = torch.tensor(importance, dtype=torch.float32)
    return torch.tensor([[[[1.0, 0.0]]]]), k


def pick(importance, keep, kernel_size=None, others=None, padding=None):
    q, k = hand_built(importance)
    T = len(importance)
    others = torch.arange(T) if others is None else torch.tensor(others)
    padding = torch.zeros(1, T, dtype=torch.bool) if padding is None else torch.tensor([padding])
    return salient_columns(q, k, others, padding, kernel_size, keep)[0].tolist()


def test_eviction_keeps_exactly_the_top_scored_columns_best_first():
    assert pick([0.1, 5.0, -2.0, 3.0, 4.0, 0.0], 3) == [1, 4, 3]
    assert pick([0.1, 5.0, -2.0, 3.0, 4.0, 0.0], 6) == [1, 4, 3, 0, 5, 2]
    # only the candidates count (the block's own columns 2, 3 are not among them), and columns come back as canvas
    # columns
    assert pick([0.1, 5.0, 9.0, 9.0, 4.0, 0.0], 2, others=[0, 1, 4, 5]) == [1, 4]


def test_scores_are_the_mean_block_query_against_each_key_averaged_over_heads():
    # two query heads sharing one key head (GQA), two block rows: importance_j = mean_h (mean_rows q_h) . k_j
    q = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # (1, 2, 2, 2): means (2, 0), (0, 1)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]]])  # scores: (2+0)/2, 3/2, 3/2, -1
    got = salient_columns(q, k, torch.arange(4), torch.zeros(1, 4, dtype=torch.bool), None, 4)
    assert got[0].tolist() == [1, 2, 0, 3]  # 1.5, 1.5 (tie: left first), 1.0, -1.0


def test_max_pooling_spreads_a_peak_to_its_neighbours_and_ties_go_left():
    # kernel 3: pooled = [5, 5, 5, 1, 4, 4, 4]; the top 4 are the three 5s then the leftmost 4
    assert pick([0.0, 5.0, 1.0, 0.0, 0.5, 4.0, 0.0], 4, kernel_size=3) == [0, 1, 2, 4]
    # pooling runs over the candidates in canvas order, across the gap the block leaves (columns 2, 3 dropped)
    # (pooled over [0, 0, 6, 0]: [0, 6, 6, 6], so column 1 takes its canvas-distant neighbour 4's score)
    assert pick([0.0, 0.0, 9.0, 9.0, 6.0, 0.0], 2, kernel_size=3, others=[0, 1, 4, 5]) == [1, 4]
    # kernel 1 is no pooling
    assert pick([0.0, 5.0, 1.0, 0.0], 2, kernel_size=1) == pick([0.0, 5.0, 1.0, 0.0], 2) == [1, 2]


def test_padding_is_never_kept_and_does_not_pool_into_its_neighbours():
    alone = pick([1.0, 0.0, 2.0, 0.5], 4, kernel_size=3)
    assert alone == [1, 2, 3, 0]  # pooled [1, 2, 2, 2]
    # the padding's scores (99) would pool into column 2 and be kept themselves if they took part
    padded = pick([99.0, 99.0, 1.0, 0.0, 2.0, 0.5], 4, kernel_size=3, padding=[True, True, False, False, False, False])
    assert padded == [c + 2 for c in alone]  # the same columns, shifted by the padding


def test_refresh_every_step_with_keep_ratio_one_is_no_cache(tiny_dir):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    ref, ref_logits, _ = decode_logged(model, ids, mask, None, gen_length=16, block_length=8, threshold=0.05)
    for kw in ({"keep_ratio": 1.0, "delay_steps": 0, "refresh_interval": 1},
               {"keep_ratio": 0.25, "kernel_size": 5, "delay_steps": 0, "refresh_interval": 1},
               {"delay_steps": 99}):  # the selection pass never comes: every step runs the canvas
        out, logits, _ = decode_logged(model, ids, mask, ("sparse", kw), gen_length=16, block_length=8,
                                       threshold=0.05)
        assert out.tokens.tolist() == ref.tokens.tolist(), kw
        assert out.nfe.tolist() == ref.nfe.tolist(), kw
        assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) < 1e-5, kw


def test_no_delay_and_keep_ratio_one_is_the_dual_cache(llada_dir):
    # every other column kept, from the block's first pass: what Fast-dLLM's dual cache attends to
    model, tok = tiny(llada_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    dual, dual_logits, _ = decode_logged(model, ids, mask, ("dual", {}), gen_length=16, block_length=8)
    out, logits, _ = decode_logged(model, ids, mask, ("sparse", {"keep_ratio": 1.0, "delay_steps": 0}),
                                   gen_length=16, block_length=8)
    assert out.tokens.tolist() == dual.tokens.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(logits, dual_logits)) < 1e-5


def logged(model, ids, mask, cache, **kw):
    """The output; (key slots layer 0 wrote, None on the selection pass; the K/V length it attended to) for each
    pass through the cache hooks; the step_in_block of every step."""
    runs = []
    update = cache.update

    def logging_update(layer_idx, input_pos, k, v):
        out = update(layer_idx, input_pos, k, v)
        if layer_idx == 0:
            runs.append((None if input_pos is None else input_pos.tolist(), out[0].shape[2]))
        return out

    cache.update = logging_update
    steps = []
    out = decode(model, ids, mask, cache, on_step=lambda lg, st: steps.append(st.step_in_block), **kw)
    return out, runs, steps


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_delay_then_selection_then_block_steps_over_the_kept_entries(llada_dir, dream_dir, family):
    model, tok = tiny(llada_dir if family == "llada" else dream_dir)
    ids = torch.tensor([tok(PROMPTS[2], add_special_tokens=False).input_ids])
    P, G, L = ids.shape[1], 16, 8
    T, shift = P + G, model.logit_shift
    K = int((T - L) * 0.5)
    cache = build_cache("sparse")
    out, runs, steps = logged(model, ids, None, cache, gen_length=G, block_length=L, num_transfer_tokens=1)
    assert steps == list(range(8)) * 2  # one token per step: 8 passes per block
    # step 0 of a block runs the canvas without the cache hooks (nothing stored); step 1 runs it through them
    # (layer 0 attends to all T keys and selects); steps 2.. run the block (Dream: and the row left of it), writing
    # after the K kept slots and attending to K + its rows
    assert len(runs) == 2 * 7
    for b in range(2):
        assert runs[7 * b] == (None, T)
        assert runs[7 * b + 1:7 * b + 7] == [(list(range(K, K + L + shift)), K + L + shift)] * 6
    # the storage holds the kept entries and the block rows only
    a = model.args
    assert tuple(cache.k.shape) == (a.n_layers, 1, a.n_kv_heads, K + L + shift, a.head_dim)


def test_kept_entries_are_the_selection_pass_keys_of_the_chosen_columns(llada_dir):
    model, tok = tiny(llada_dir)
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=False).input_ids])
    cache = build_cache("sparse", keep_ratio=0.4)
    full = {}
    observe = cache.observe_attention

    def spy(layer_idx, q, k):
        full[layer_idx] = (q.clone(), k.clone())
        observe(layer_idx, q, k)

    cache.observe_attention = spy
    blocks = []
    decode(model, ids, None, cache, gen_length=8, block_length=8, num_transfer_tokens=1,
           on_step=lambda lg, st: blocks.append(st.block))
    T, blk = ids.shape[1] + 8, blocks[0]
    others = torch.cat([torch.arange(blk.start), torch.arange(blk.stop, T)])
    K = int(len(others) * 0.4)
    for i, (q, k) in full.items():
        cols = salient_columns(q[:, :, blk], k, others, torch.zeros(1, T, dtype=torch.bool), 3, K)
        assert torch.equal(cache.k[i, :, :, :K], k[:, :, cols[0]])


def test_parameters_are_checked():
    for kw, msg in [({"keep_ratio": 0.0}, "keep_ratio must be a number in (0, 1], got 0.0"),
                    ({"keep_ratio": 1.5}, "keep_ratio must be a number in (0, 1], got 1.5"),
                    ({"kernel_size": 4}, "kernel_size must be an odd integer >= 1 (or None for no pooling), got 4"),
                    ({"kernel_size": 0}, "kernel_size must be an odd integer >= 1 (or None for no pooling), got 0"),
                    ({"delay_steps": -1}, "delay_steps must be an integer >= 0, got -1"),
                    ({"refresh_interval": 0}, "refresh_interval must be an integer >= 1 (or None), got 0")]:
        with pytest.raises(ValueError) as e:
            build_cache("sparse", **kw)
        assert str(e.value) == msg
    c = build_cache("sparse", kernel_size="none", keep_ratio="0.7")
    assert (c.kernel_size, c.keep_ratio, c.delay_steps, c.refresh_interval) == (None, 0.7, 1, None)
    d = build_cache("sparse")
    assert (d.keep_ratio, d.kernel_size) == (0.5, 3)  # the release's scripts and configs


@pytest.mark.parametrize("strategy, need", [("wino", "runs rows that are not part of the canvas"),
                                            ("daedal", "changes the canvas length")])
def test_strategies_that_need_more_are_refused(strategy, need):
    with pytest.raises(ValueError, match=rf"^strategy {strategy!r} cannot be used with cache='sparse': the strategy "
                                         rf"{need}"):
        check_compatible(SAMPLERS[strategy], CACHES["sparse"])


def test_one_cache_across_calls_of_different_shapes_is_a_fresh_cache_each_time(tiny_dir):
    # lm-eval reuses the cache object for every batch: storage sized for one shape must not leak into the next
    model, tok = tiny(tiny_dir)
    cache = build_cache("sparse", keep_ratio=0.3)
    for prompts, G in ((PROMPTS, 16), (PROMPTS[:1], 24), (PROMPTS, 16)):
        _, ids, mask = left_pad(tok, prompts)
        mask = None if len(prompts) == 1 else mask
        reused = decode(model, ids, mask, cache, gen_length=G, block_length=8, threshold=0.05)
        fresh = decode(model, ids, mask, ("sparse", {"keep_ratio": 0.3}), gen_length=G, block_length=8,
                       threshold=0.05)
        assert reused.tokens.tolist() == fresh.tokens.tolist() and reused.nfe.tolist() == fresh.nfe.tolist()
