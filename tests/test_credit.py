"""CreditSampler (lmeval_dllm/samplers/credit.py): the credit matrix against its recurrence written out, dInfer's
threshold rule, mask-token proposals, the block reset; then through the decode loop (batch = each prompt alone)."""

from __future__ import annotations

import math

import pytest
import torch
from batches import assert_each_row_as_alone, left_pad, tiny
from samplers_support import MASK, peaked, state_with

from lmeval_dllm.caches import build_cache
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.credit import dinfer_threshold_mask

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]


def sampler(**kw):
    return build_sampler("credit", Proposal.from_params(), **kw)


def test_threshold_rule_commits_above_threshold_else_the_best():
    cand = torch.tensor([[True, True, True, False], [True, True, True, True]])
    scores = torch.tensor([[0.95, 0.3, 0.9, 0.99], [0.5, 0.5 - 5e-6, 0.4, 0.2]])
    # row 0: 0.95 and 0.9 reach 0.9 (0.99 is not a candidate); row 1: none does: the best and what is within 1e-5
    assert dinfer_threshold_mask(scores, cand, 0.9).tolist() == [[True, False, True, False],
                                                                 [True, True, False, False]]
    assert not dinfer_threshold_mask(scores, torch.zeros_like(cand), 0.9).any()


def test_first_step_fuses_the_top1_probability_into_its_logit():
    s = state_with([[MASK, MASK, 5]])
    logits = peaked([0.6, 0.3, 0.99], [1, 2, 3])
    smp = sampler(threshold=0.7, credit_alpha=0.7, boost_gamma=0.2)
    smp.begin_block(s)
    out = smp.step(logits, s)
    credit = s.sampler_state["credit"]
    assert credit[0, 0, 1].item() == pytest.approx(0.6 ** 0.2, rel=1e-6)
    assert credit[0, 1, 2].item() == pytest.approx(0.3 ** 0.2, rel=1e-6)
    assert credit[0, 2].abs().sum() == 0  # decoded position: no credit
    assert credit.count_nonzero() == 2
    # fused probability of the top-1 at position 0: 0.6 e^{a log(1+c)} / (0.6 e^{...} + 0.4)
    boost = math.exp(0.7 * math.log(1 + 0.6 ** 0.2))
    fused0 = 0.6 * boost / (0.6 * boost + 0.4)
    assert fused0 > 0.7 > 0.6  # credit lifts it over the threshold
    assert out.commit.tolist() == [[True, False, False]]
    assert out.tokens[0, 0] == 1


def test_credit_decays_and_accumulates_over_steps():
    s = state_with([[MASK, MASK]])
    smp = sampler(threshold=1.0, decay_beta=0.5, boost_gamma=1.0)
    smp.begin_block(s)
    smp.step(peaked([0.4, 0.3], [1, 2]), s)
    smp.step(peaked([0.4, 0.3], [1, 4]), s)  # position 1 changes its top-1
    credit = s.sampler_state["credit"]
    assert credit[0, 0, 1].item() == pytest.approx(0.5 * 0.4 + 0.4, rel=1e-6)
    assert credit[0, 1, 2].item() == pytest.approx(0.5 * 0.3, rel=1e-6)
    assert credit[0, 1, 4].item() == pytest.approx(0.3, rel=1e-6)
    smp.begin_block(s)  # a new block starts from zero credit
    smp.step(peaked([0.4, 0.3], [1, 2]), s)
    assert s.sampler_state["credit"][0, 0, 1].item() == pytest.approx(0.4, rel=1e-6)


def test_a_proposed_mask_token_is_not_committed():
    s = state_with([[MASK, MASK]])
    smp = sampler(threshold=0.5)
    smp.begin_block(s)
    out = smp.step(peaked([0.99, 0.6], [MASK, 2]), s)
    assert out.commit.tolist() == [[False, True]]


def test_rows_of_a_batch_are_independent():
    blocks = [[MASK, MASK, 5], [MASK, 4, MASK]]
    conf, tokens = [[0.5, 0.6, 0.9], [0.2, 0.9, 0.95]], [[1, 2, 3], [5, 6, 7]]
    batch_state = state_with(blocks)
    smp = sampler()
    smp.begin_block(batch_state)
    for _ in range(2):
        batch = smp.step(peaked(conf, tokens), batch_state)
    for i in range(2):
        s = state_with([blocks[i]])
        smp.begin_block(s)
        for _ in range(2):
            alone = smp.step(peaked(conf[i], tokens[i]), s)
        assert batch.commit[i].tolist() == alone.commit[0].tolist()
        assert torch.equal(batch_state.sampler_state["credit"][i], s.sampler_state["credit"][0])


@pytest.mark.parametrize("kw,msg", [
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
    ({"credit_alpha": -1.0}, "credit_alpha must be a finite number >= 0"),
    ({"boost_gamma": float("inf")}, "boost_gamma must be a finite number >= 0"),
    ({"decay_beta": 1.5}, r"decay_beta must be in \[0, 1\]"),
    ({"credit_alhpa": 0.5}, "unknown parameter 'credit_alhpa' for strategy 'credit'; did you mean 'credit_alpha'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        sampler(**kw)


def run(model, ids, mask, cache=None, **kw):
    return generate(model, ids, mask, sampler(**kw), GenerationConfig(16, 8), stop_token_ids=torch.tensor([999]),
                    cache=build_cache(*cache) if cache else None)


@pytest.mark.parametrize("cache", [None, ("prefix", ), ("dual", ), ("vicinity", )])
def test_batch_equals_each_prompt_alone(tiny_dir, cache):
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    kw = {"threshold": 0.02}  # random tiny weights: low confidences
    batch = run(model, ids, mask, cache, **kw)
    assert (batch.tokens != model.mask_token_id).all()
    assert (batch.nfe < 16).any()  # several tokens per step somewhere
    assert_each_row_as_alone(batch, enc, lambda x: run(model, x, None, cache, **kw), cache)
