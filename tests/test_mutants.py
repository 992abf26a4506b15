"""Boundary tests that kill the mutants a review found surviving (issue 12): each case puts a value *exactly* on a
boundary (a confidence equal to the threshold, a cumulative mass equal to top_p, a tie at the k-th logit, a score
equal to the factor bound, a remainder in LLaDA's schedule) and asserts the exact positions / tokens / counts.

Exactness: every probability here comes out of float32 arithmetic exactly: softmax of a few equal logits (the rest
-inf) gives 1, 1/2 or 1/4 (exp(0) = 1, exp(-inf) = 0, division by a power of two); scores given directly are sums
of powers of two (0.5, 0.75); the factor bounds 1 - f / (n + 1) used are 0.75 and 0.5.

The reference semantics (../shared/spec/algorithms.md, NVlabs/Fast-dLLM ``llada/generate.py``):
- threshold: a candidate is committed iff its confidence >= threshold (Fast-dLLM's release drops a ranked
  candidate only when ``confidence < threshold``), at least the per-step count;
- factor: the n-th ranked candidate is accepted while c_(n) >= 1 - factor / (n + 1) (the release breaks at
  ``sorted_conf < thresh``), the first always;
- top_p: rank r survives iff the mass of ranks 0..r-1 is <= top_p (Dream's rule: the token that crosses top_p
  is kept);
- top_k: logits strictly below the k-th largest are dropped (ties at the boundary kept);
- steps: LLaDA's get_num_transfer_tokens, m // s per step plus one for the first m % s steps of a block.
"""

from __future__ import annotations

import math

import pytest
import torch
from samplers_support import state_with

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.base import factor_count, threshold_mask
from scripted import ScriptedModel

T, F = True, False
NEG = float("-inf")
V = 10
MASK = 9  # samplers_support.MASK


def exact_logits(rows):
    """(1, L, V) logits; rows[i] = (token, ties): ``token`` and the ``ties - 1`` next ids share logit 0, every
    other token is -inf. The greedy token is the lowest id among them (argmax returns the first maximum) and its
    softmax probability is exactly 1 / ties."""
    out = torch.full((1, len(rows), V), NEG)
    for i, (tok, ties) in enumerate(rows):
        ids = [tok] + [t for t in range(V) if t > tok][: ties - 1]
        assert len(ids) == ties
        out[0, i, ids] = 0.0
    return out


# --- Fast-dLLM threshold: >= (a confidence equal to the threshold is committed) --------------------------------


def test_threshold_mask_commits_scores_equal_to_the_threshold():
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.75]])
    cand = torch.ones(1, 5, dtype=torch.bool)
    one = torch.tensor([1])
    assert threshold_mask(scores, cand, 0.75, one).tolist() == [[T, T, F, F, T]]
    assert threshold_mask(scores, cand, 0.5, one).tolist() == [[T, T, T, F, T]]
    assert threshold_mask(scores, cand, 1.0, one).tolist() == [[T, F, F, F, F]]
    # at least min_count: the top 2 (the tie at 0.75 goes to the lower position) although only one passes
    assert threshold_mask(scores, cand, 1.0, torch.tensor([2])).tolist() == [[T, T, F, F, F]]
    # the equal scores are not the top-1 here: only the >= comparison commits them
    assert threshold_mask(torch.tensor([[0.25, 0.5, 0.5]]), torch.ones(1, 3, dtype=torch.bool), 0.5,
                          torch.tensor([0])).tolist() == [[F, T, T]]


def test_vanilla_threshold_step_commits_confidence_equal_to_threshold():
    # confidences exactly 1/2, 1, 1/4, 1/2, 1/4 (ties of 2, 1, 4, 2, 4 tokens)
    logits = exact_logits([(3, 2), (5, 1), (0, 4), (6, 2), (1, 4)])
    s = state_with([[MASK] * 5])
    assert Proposal.from_params()(logits).confidence.tolist() == [[0.5, 1.0, 0.25, 0.5, 0.25]]

    def commit(threshold, **kw):
        out = build_sampler("vanilla", Proposal.from_params(**kw), threshold=threshold).step(logits, s)
        assert out.tokens.tolist() == [[3, 5, 0, 6, 1]]
        return out.commit.tolist()

    assert commit(0.5) == [[T, T, F, T, F]]
    assert commit(0.25) == [[T] * 5]
    assert commit(1.0) == [[F, T, F, F, F]]
    assert commit(0.5, alg="maskgit_plus") == [[T, T, F, T, F]]
    # num_transfer_tokens is only the minimum: the tie at 0.5 (positions 0, 3) goes in with the 1.0
    out = build_sampler("vanilla", Proposal.from_params(), threshold=0.5, num_transfer_tokens=2).step(logits, s)
    assert out.commit.tolist() == [[T, T, F, T, F]]


@pytest.mark.timeout(60)  # a rule that commits nothing would spin the loop forever
def test_threshold_equal_confidence_through_the_decode_loop():
    """ScriptedModel with score 0 everywhere: every token has logit 0, so each position's confidence is exactly
    1/32 and the greedy token is id 0. threshold = 1/32 commits the whole block in one step; with a strict > it
    would fall back to one token per step."""
    model = ScriptedModel([[10] * 8], [[0.0] * 8])
    sampler = build_sampler("vanilla", Proposal.from_params(), threshold=1 / 32)
    out = generate(model, torch.tensor([[1, 2]]), None, sampler, GenerationConfig(8, 4),
                   stop_token_ids=torch.tensor([30]))
    assert out.decoded_at.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert out.tokens.tolist() == [[0] * 8] and out.steps == 2 and out.nfe.tolist() == [2]


def test_ar_threshold_prefix_includes_scores_equal_to_the_threshold():
    logits = exact_logits([(3, 1), (5, 2), (0, 2), (6, 4), (1, 1)])  # 1, 1/2, 1/2, 1/4, 1
    s = state_with([[MASK] * 5])
    out = build_sampler("ar", Proposal.from_params(), threshold=0.5).step(logits, s)
    assert out.commit.tolist() == [[T, T, T, F, F]]  # the passing prefix stops at the 1/4
    out = build_sampler("ar", Proposal.from_params(), threshold=0.25).step(logits, s)
    assert out.commit.tolist() == [[T] * 5]


# --- top_p: the token that crosses top_p is kept; mass before it == top_p keeps it too ---------------------------


@pytest.mark.parametrize("top_p,kept", [(0.25, 2), (0.5, 3), (0.75, 4), (0.1, 1), (0.3, 2), (1.0, 4)])
def test_top_p_boundary_keeps_rank_whose_mass_before_equals_top_p(top_p, kept):
    # four tokens of probability exactly 1/4: masses before ranks 0..3 are exactly 0, 1/4, 1/2, 3/4
    logits = exact_logits([(2, 4)])
    surv = torch.isfinite(Proposal.from_params(top_p=top_p).filtered(logits))[0, 0]
    assert int(surv.sum()) == kept
    assert set(surv.nonzero()[:, 0].tolist()) <= {2, 3, 4, 5}
    # maskgit_plus reads the renormalised nucleus: 1 / kept
    conf = Proposal.from_params(alg="maskgit_plus", top_p=top_p)(logits, need_probs=True)
    assert conf.confidence.item() == pytest.approx(1.0 / kept, rel=1e-6)
    assert int((conf.probs[0, 0] > 0).sum()) == kept


def test_top_p_boundary_with_distinct_probabilities():
    # p = 1/2, 1/4, 1/8, 1/16, 1/16 on tokens 7, 1, 4, 5, 6: masses before ranks 0..2 are exactly 0, 1/2, 3/4
    logits = torch.full((1, 1, V), NEG)
    for tok, k in {7: 0, 1: 1, 4: 2, 5: 3, 6: 3}.items():
        logits[0, 0, tok] = -k * math.log(2.0)
    p = torch.softmax(logits, -1)[0, 0]
    if p[[7, 1, 4, 5]].tolist() != [0.5, 0.25, 0.125, 0.0625]:  # pragma: no cover - exact with IEEE float32 exp
        pytest.skip(f"float32 softmax not exact on this platform: {p.tolist()}")

    def survivors(top_p):
        return sorted(torch.isfinite(Proposal.from_params(top_p=top_p).filtered(logits))[0, 0].nonzero()[:, 0].tolist())

    assert survivors(0.4) == [7]
    assert survivors(0.5) == [1, 7]  # mass before token 1 is exactly top_p: kept
    assert survivors(0.6) == [1, 7]
    assert survivors(0.75) == [1, 4, 7]  # mass before token 4 is exactly top_p: kept
    assert Proposal.from_params(alg="maskgit_plus", top_p=0.5)(logits).confidence.item() == pytest.approx(2 / 3)
    assert Proposal.from_params(alg="maskgit_plus", top_p=0.75)(logits).confidence.item() == pytest.approx(4 / 7)


# --- top_k: ties at the k-th logit are kept, strictly smaller dropped -------------------------------------------


@pytest.mark.parametrize("top_k,kept", [(1, [4]), (2, [0, 4, 6]), (3, [0, 4, 6]), (4, [0, 2, 4, 6]),
                                        (5, [0, 2, 4, 6, 8]), (50, [0, 2, 4, 6, 8])])
def test_top_k_boundary(top_k, kept):
    logits = torch.full((1, 1, V), NEG)
    for tok, value in {4: 3.0, 0: 2.0, 6: 2.0, 2: 1.0, 8: 0.0}.items():
        logits[0, 0, tok] = value
    surv = torch.isfinite(Proposal.from_params(top_k=top_k).filtered(logits))[0, 0]
    assert surv.nonzero()[:, 0].tolist() == kept


def test_top_k_tie_keeps_both_in_the_confidence():
    # three tokens at logit 0: top_k=2 keeps all three (tie at the boundary), so maskgit_plus reads 1/3 not 1/2
    logits = exact_logits([(0, 3)])
    got = Proposal.from_params(alg="maskgit_plus", top_k=2)(logits)
    assert got.tokens.item() == 0 and got.confidence.item() == pytest.approx(1 / 3, abs=1e-7)
    got = Proposal.from_params(alg="maskgit_plus", top_k=1)(exact_logits([(0, 1)]))
    assert got.confidence.item() == 1.0


# --- factor: c_(n) == 1 - factor / (n + 1) is accepted -----------------------------------------------------------


def test_factor_count_accepts_a_score_equal_to_the_bound():
    cand = torch.ones(1, 4, dtype=torch.bool)
    # factor 1: bounds n=2: 2/3, n=3: 3/4 (exact), n=4: 4/5
    assert factor_count(torch.tensor([[0.9, 0.8, 0.75, 0.5]]), cand, 1.0).tolist() == [3]
    assert factor_count(torch.tensor([[0.75, 0.9, 0.5, 0.8]]), cand, 1.0).tolist() == [3]  # order-free
    # factor 2: bounds n=2: 1/3, n=3: 1/2 (exact), n=4: 3/5
    assert factor_count(torch.tensor([[0.9, 0.6, 0.5, 0.5]]), cand, 2.0).tolist() == [3]
    # factor 0.5: n=2 bound 5/6, n=3 bound 7/8 = 0.875 (exact)
    assert factor_count(torch.tensor([[0.875, 0.875, 0.875, 0.5]]), cand, 0.5).tolist() == [3]
    # no candidate: nothing (the always-accepted first rank is clamped to the candidates)
    assert factor_count(torch.tensor([[0.9, 0.9, 0.9, 0.9]]), torch.zeros(1, 4, dtype=torch.bool), 1.0).tolist() == [0]


def test_vanilla_factor_step_boundary_and_minimum():
    s = state_with([[MASK, MASK, 5, MASK, MASK]])
    # position 2 is decoded (not a candidate); candidates' confidences 1, 1/2, 1/2, 1/4; factor 2: bounds n=2: 1/3,
    # n=3: 1/2 (exact, accepted), n=4: 3/5
    logits = exact_logits([(3, 2), (5, 1), (7, 1), (0, 4), (6, 2)])
    out = build_sampler("vanilla", Proposal.from_params(), factor=2.0).step(logits, s)
    assert out.commit.tolist() == [[T, T, F, F, T]]
    # factor 1: n=2 bound 2/3 > 1/2: only the first; num_transfer_tokens=3 raises it to the top 3 (ties by position)
    out = build_sampler("vanilla", Proposal.from_params(), factor=1.0).step(logits, s)
    assert out.commit.tolist() == [[F, T, F, F, F]]
    out = build_sampler("vanilla", Proposal.from_params(), factor=1.0, num_transfer_tokens=3).step(logits, s)
    assert out.commit.tolist() == [[T, T, F, F, T]]
    # the minimum never lowers what the factor rule accepts
    out = build_sampler("vanilla", Proposal.from_params(), factor=2.0, num_transfer_tokens=1).step(logits, s)
    assert out.commit.tolist() == [[T, T, F, F, T]]


# --- steps / num_transfer_tokens: exact per-step counts ----------------------------------------------------------


def _per_step_counts(kw, G, Lb):
    # strictly decreasing confidence: every step commits the leftmost masked positions of the block
    targets = [list(range(10, 10 + G))]
    scores = [[float(G - j) for j in range(G)]]
    sampler = build_sampler("vanilla", Proposal.from_params(), **kw)
    out = generate(ScriptedModel(targets, scores), torch.tensor([[1, 2]]), None, sampler, GenerationConfig(G, Lb),
                   stop_token_ids=torch.tensor([30]))
    assert out.tokens.tolist() == targets
    stamps = out.decoded_at[0].tolist()
    assert stamps == sorted(stamps)  # left to right: the counts below say everything
    return [stamps.count(i) for i in range(out.steps)], out


@pytest.mark.parametrize("kw,G,Lb,counts", [
    # 10 masks over 4 steps per block: 10 // 4 = 2, remainder 2 to the first two steps
    ({"steps": 8}, 20, 10, [3, 3, 2, 2, 3, 3, 2, 2]),
    # 10 masks over 3 steps: 4, 3, 3
    ({"steps": 6}, 20, 10, [4, 3, 3, 4, 3, 3]),
    # one block, 7 masks over 5 steps: 2, 2, 1, 1, 1
    ({"steps": 5}, 7, 7, [2, 2, 1, 1, 1]),
    # steps = gen_length: one per step
    ({"steps": 8}, 8, 4, [1] * 8),
    # steps = number of blocks: the whole block in one step
    ({"steps": 2}, 8, 4, [4, 4]),
    # num_transfer_tokens: n per step, the last step of a block takes the remainder
    ({"num_transfer_tokens": 3}, 20, 10, [3, 3, 3, 1, 3, 3, 3, 1]),
    ({"num_transfer_tokens": 4}, 8, 4, [4, 4]),
    ({"num_transfer_tokens": 5}, 8, 4, [4, 4]),
    ({}, 6, 3, [1] * 6),
])
@pytest.mark.timeout(60)
def test_schedule_exact_counts(kw, G, Lb, counts):
    got, out = _per_step_counts(kw, G, Lb)
    assert got == counts
    assert out.steps == len(counts) and out.nfe.tolist() == [len(counts)] and out.committed.tolist() == [G]


@pytest.mark.timeout(60)
def test_threshold_and_factor_count_at_least_the_steps_schedule():
    # scores 1 -> confidence e / (e + 31) = 0.08: below threshold 0.5 everywhere, so the schedule decides
    targets, scores = [list(range(10, 20))], [[1.0] * 10]
    for kw in ({"threshold": 0.5}, {"factor": 0.01}):
        sampler = build_sampler("vanilla", Proposal.from_params(), steps=4, **kw)
        out = generate(ScriptedModel(targets, scores), torch.tensor([[1, 2]]), None, sampler,
                       GenerationConfig(10, 10), stop_token_ids=torch.tensor([30]))
        stamps = out.decoded_at[0].tolist()
        assert [stamps.count(i) for i in range(out.steps)] == [3, 3, 2, 2], kw
