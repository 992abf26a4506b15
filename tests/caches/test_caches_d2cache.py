"""d2Cache's parts, each against a direct restatement: the certainty density (spec §0.5), head-averaged attention
probabilities, the attention rollout over partially recomputed rows, the query selection rules, and which columns
come back with real logits."""

from __future__ import annotations

import math

import pytest
import torch
from caches_support import PROMPTS, decode, left_pad, tiny

import lmeval_dllm.caches.d2cache as d2
from lmeval_dllm.caches import build_cache
from lmeval_dllm.state import DecodeState, StepOutput


def test_density_matches_the_closed_form():
    # spec §0.5 example: G = 8, nothing decoded, sigma = 10
    dens = d2.certainty_density(torch.zeros(1, 8, dtype=torch.bool), d2.density_kernel(8, 10.0))
    expected = [.287, .274, .259, .242, .224, .206, .187, .169]
    assert torch.allclose(dens[0], torch.tensor(expected), atol=1e-3)
    # against the sum written out, for random decoded patterns
    G, sigma = 12, 3.0
    u = torch.rand(4, G) < 0.5
    z = sum(math.exp(-d * d / (2 * sigma ** 2)) for d in range(-3 * G, 3 * G))
    for b in range(4):
        ext = {m: 1.0 if m < 0 else float(u[b, m]) if m < G else float(u[b, -1]) for m in range(-G, 2 * G)}
        ref = [sum(w * math.exp(-(j - m) ** 2 / (2 * sigma ** 2)) for m, w in ext.items()) / z for j in range(G)]
        got = d2.certainty_density(u[b:b + 1], d2.density_kernel(G, sigma))[0]
        assert torch.allclose(got, torch.tensor(ref), atol=1e-6)


def test_head_mean_probs_match_per_head_softmax():
    torch.manual_seed(0)
    B, Hq, Hkv, M, T, Dh = 2, 6, 2, 5, 9, 8
    q, k = torch.randn(B, Hq, M, Dh), torch.randn(B, Hkv, T, Dh)
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, :3] = False
    ref = torch.zeros(B, M, T)
    for h in range(Hq):
        s = q[:, h] @ k[:, h // (Hq // Hkv)].transpose(-1, -2) / math.sqrt(Dh)
        ref += s.masked_fill(~keys[:, None, :], float("-inf")).softmax(-1) / Hq
    assert torch.allclose(d2.head_mean_probs(q, k, keys), ref, atol=1e-6)


def test_rollout_importance_matches_dense_rollout(llada_dir, monkeypatch):
    """Importance = column sums of prod_l rownorm(A_l + I), where rows of positions not run are identity rows."""
    model, tok = tiny(llada_dir)
    enc, _, _ = left_pad(tok, PROMPTS[:1])
    ids = torch.tensor(enc)
    cache = build_cache("d2cache", current_k=3)
    probs, seen = [], []
    inner = d2.head_mean_probs
    monkeypatch.setattr(d2, "head_mean_probs", lambda q, k, m: (probs.append(inner(q, k, m)), probs[-1])[1])
    forward = cache.forward

    def logged(model_, state, targets, extra=None):
        probs.clear()
        queries = cache.queries[0].clone() if state.step else torch.ones(state.x.shape[1], dtype=torch.bool)
        out = forward(model_, state, targets, extra)
        seen.append((queries, [p[0].clone() for p in probs], cache.importance[0].clone()))
        return out

    cache.forward = logged
    out = decode(model, ids, None, cache, gen_length=16, block_length=8, steps=4)
    assert len(seen) == out.steps >= 4 and 0 < int(seen[2][0].sum()) < ids.shape[1] + 16  # partial steps ran
    for queries, layer_probs, importance in seen:
        T = queries.shape[0]
        rows = queries.nonzero()[:, 0]  # the order the cache runs them in (real rows first, by position)
        R = torch.eye(T)
        for a in layer_probs:
            step = torch.eye(T)
            for m, j in enumerate(rows.tolist()):
                row = a[m] + torch.nn.functional.one_hot(torch.tensor(j), T)
                step[j] = row / row.sum()
            R = step @ R
        assert torch.allclose(importance, R.sum(0), atol=1e-5)


def _selection_state(model, masked_before, masked_after, block, P=4, B=1):
    G = len(masked_before[0])
    x = torch.randint(0, 200, (B, P + G))
    x[:, P:][torch.tensor(masked_after)] = model.mask_token_id
    state = DecodeState(x=x, position_ids=torch.arange(P + G).expand(B, -1), attention_mask=None, prompt_len=P,
                        mask_token_id=model.mask_token_id, stop_token_ids=torch.tensor([999]),
                        block=slice(P + block[0], P + block[1]), active=torch.ones(B, dtype=torch.bool))
    return state


def _select(model, cache, masked_before, masked_after, kappa, importance, block=(0, 8), active=None):
    state = _selection_state(model, masked_before, masked_after, block, B=len(masked_before))
    cache.setup(model, state)
    G = len(masked_before[0])
    cache.was_masked = torch.tensor(masked_before)
    cache.kappa[:, :G] = torch.tensor(kappa)
    cache.importance = torch.tensor(importance)
    if active is not None:
        state.active = torch.tensor(active)
    cache.end_step(state, StepOutput(commit=torch.zeros(1, 1, dtype=torch.bool), tokens=torch.zeros(1, 1)))
    return cache.queries.nonzero()[:, 1].tolist() if len(masked_before) == 1 else cache.queries


M, D = True, False  # masked, decoded


def test_selection_llada(llada_dir):
    """current_k=2: the two best in-block masks by kappa x density, the column committed in the step, and the
    top rollout position (rollout_p=0 keeps exactly one)."""
    model, _ = tiny(llada_dir)
    before = [[D, D, M, M, D, M, M, D, M, M, D, M, M, M, M, M]]
    after = [[D, D, D, M, D, M, M, D, M, M, D, M, M, M, M, M]]  # column 2 committed
    kappa = [[0, 0, 0, .1, 0, .9, .5, 0, 1., 1., 0, 1., 1., 1., 1., 1.]]  # later blocks: confident, not eligible
    importance = [[1.0, 5.0] + [1.0] * 18]  # every unqueried position has importance >= 1 (its identity row)
    queries = _select(model, build_cache("d2cache", current_k=2, rollout_p=0.0), before, after, kappa, importance)
    assert queries == [1, 4 + 2, 4 + 5, 4 + 6]


def test_selection_window_extends_to_the_block_holding_the_kth_mask(llada_dir):
    model, _ = tiny(llada_dir)
    before = after = [[D, D, D, D, D, D, D, M, D, M, D, M, M, M, M, M]]
    kappa = [[0.0] * 7 + [.2, 0, .3, 0, .9, .8, .95, .99, .99]]
    # 3rd mask at column 11 -> window = columns 0..15 (blocks of 8); in-block column 7 first, then the best two
    queries = _select(model, build_cache("d2cache", current_k=3, rollout_p=0.0), before, after, kappa,
                      [[1.0, 2.0] + [1.0] * 18])
    dens = d2.certainty_density(~torch.tensor(after), d2.density_kernel(16, 10.0))[0]
    score = torch.tensor(kappa[0]) * dens
    best = sorted([9, 11, 12, 13, 14, 15], key=lambda j: -score[j].item())[:2]
    assert queries == [1] + sorted(4 + j for j in [7] + best)


def test_selection_dream_runs_the_row_left_of_each_column(dream_dir):
    model, _ = tiny(dream_dir)
    before = after = [[M] * 16]
    kappa = [[.9, .8] + [0.1] * 14]
    queries = _select(model, build_cache("d2cache", current_k=2, rollout_p=0.0), before, after, kappa,
                      [[1.0] * 8 + [7.0] + [1.0] * 11])
    assert queries == [3, 4, 8]  # rows P-1 and P predict columns 0 and 1; position 8 is the rollout pick


def test_inflation_fills_small_gaps(llada_dir):
    model, _ = tiny(llada_dir)
    before = after = [[D, D, D, D, M, D, M, D, D, D, D, D, D, D, D, D]]
    kappa = [[0, 0, 0, 0, .9, 0, .9] + [0.0] * 9]
    cache = build_cache("d2cache", current_k=2, rollout_p=0.0, inflate_w=2)
    queries = _select(model, cache, before, after, kappa, [[3.0] + [1.0] * 19])
    assert queries == [0, 8, 9, 10]  # 9 fills the gap between the selected 8 and 10


def test_rows_that_do_not_decode_keep_their_queries(llada_dir):
    model, _ = tiny(llada_dir)
    before = after = [[M] * 16, [M] * 16]
    queries = _select(model, build_cache("d2cache", current_k=1, rollout_p=0.0), before, after,
                      [[1.0] * 16, [1.0] * 16], [[1.0] * 20, [1.0] * 20], active=[True, False])
    assert int(queries[0].sum()) == 2 and queries[1].all()  # row 1 keeps the initial "run everything"


def test_only_recomputed_columns_are_fresh_and_committed(tiny_dir):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    cache = build_cache("d2cache", current_k=2)
    checked = []
    forward = cache.forward

    def logged(model_, state, targets, extra=None):
        before = cache.queries.clone()
        out = forward(model_, state, targets, extra)
        if state.step:  # partial step: fresh columns are those predicted by the rows run
            shift = model.logit_shift
            run = before & state.active[:, None]
            expected = torch.zeros_like(run)
            expected[:, state.prompt_len:] = run[:, state.prompt_len - shift:run.shape[1] - shift]
            assert torch.equal(out.fresh, expected)
            checked.append(state.step)
        return out

    cache.forward = logged
    out = decode(model, ids, mask, cache, gen_length=16, block_length=8, threshold=0.05)
    assert len(checked) == out.steps - 1
    assert (out.tokens != model.mask_token_id).all()


def test_parameters_are_checked():
    with pytest.raises(ValueError, match=r"^rollout_p must be in \[0, 1\], got 2.0$"):
        build_cache("d2cache", rollout_p=2.0)
    with pytest.raises(ValueError, match=r"^current_k must be an integer >= 1, got 0$"):
        build_cache("d2cache", current_k=0)
    with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0, got 0.0$"):
        build_cache("d2cache", sigma=0.0)
    with pytest.raises(ValueError, match=r"^inflate_w must be an integer >= 0, got -1$"):
        build_cache("d2cache", inflate_w=-1)
    c = build_cache("d2cache")
    assert (c.rollout_p, c.current_k, c.sigma, c.inflate_w, c.refresh_interval) == (0.1, 32, 10.0, 0, None)
