"""EntropyBoundSampler (lmeval_dllm/samplers/eb_sampler.py): the entropy budget on hand-built entropies and logits,
the reference port's batch-axis bug (spec §14.3) as a regression test, errors, batching on the tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from batches import left_pad
from samplers_support import MASK, entropy_of_peaked, peaked, state_with

from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.eb_sampler import entropy_bound_count

def count(scores, entropy, gamma, candidates=None):
    scores, entropy = torch.tensor(scores), torch.tensor(entropy)
    cand = torch.ones_like(scores, dtype=torch.bool) if candidates is None else torch.tensor(candidates)
    return entropy_bound_count(scores, entropy, cand, gamma).tolist()


def test_sum_minus_max_along_the_ranked_axis():
    """Spec §15: ranked entropies [0.0, 0.5, 0.01], gamma 0.02. Prefix sums minus prefix maxima: 0, 0, 0.01, all
    <= 0.02, so the paper's rule takes all 3. (The reference port, whose running max degenerates to the current
    entropy at batch size 1, excludes the last token's own entropy instead and takes 2.)"""
    assert count([[0.9, 0.8, 0.7]], [[0.0, 0.5, 0.01]], 0.02) == [3]
    assert count([[0.9, 0.8, 0.7]], [[0.0, 0.5, 0.01]], 0.009) == [2]
    # prefixes follow the score ranking, not the column order: ranked [0.05, 0.05, 0.0] stops after one token
    # (0.1 - 0.05 > 0.02 at rank 2), ranked [0.0, 0.05, 0.05] after two
    assert count([[0.9, 0.8, 0.7]], [[0.05, 0.05, 0.0]], 0.02) == [1]
    assert count([[0.7, 0.8, 0.9]], [[0.05, 0.05, 0.0]], 0.02) == [2]


def test_rows_do_not_contaminate_each_other():
    """Spec §14.3: the reference takes the running max along the batch axis, so row 1 used row 0's maxima."""
    scores = [[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]]
    entropy = [[0.0, 0.5, 0.01], [0.3, 0.3, 0.3]]
    assert count(scores, entropy, 0.02) == [3, 1]
    assert count(scores[1:], entropy[1:], 0.02) == [1]  # row 1 alone: 0.3 + 0.3 - 0.3 = 0.3 > 0.02 at rank 2
    assert count(scores[::-1], entropy[::-1], 0.02) == [1, 3]


def test_gamma_zero_and_candidates():
    assert count([[0.9, 0.8, 0.7]], [[0.1, 0.2, 0.3]], 0.0) == [1]  # no zero entropies: one token
    assert count([[0.9, 0.8, 0.7]], [[0.0, 0.0, 0.3]], 0.0) == [3]  # zeros are free, the max is free
    assert count([[0.9, 0.8, 0.7]], [[0.0, 0.0, 0.0]], 0.0, [[True, False, True]]) == [2]  # only candidates count
    assert count([[0.9, 0.8, 0.7]], [[0.0, 0.0, 0.0]], 0.0, [[False, False, False]]) == [0]


def step(conf, gamma, rows=([MASK] * 4,), **kw):
    sampler = build_sampler("eb_sampler", Proposal.from_params(), gamma=gamma, **kw)
    return sampler.step(peaked(conf, [3, 4, 5, 6]), state_with(rows)).commit[0].tolist()


def test_step_on_hand_built_logits():
    conf = [0.99, 0.6, 0.95, 0.9]  # ranked: positions 0, 2, 3, 1
    h = [entropy_of_peaked(c) for c in conf]
    budget_two = h[0] + h[2] - max(h[0], h[2])  # = the smaller of the first two ranked entropies
    assert step(conf, budget_two - 1e-4) == [True, False, False, False]
    assert step(conf, budget_two + 1e-4) == [True, False, True, False]
    budget_three = h[0] + h[2] + h[3] - max(h[0], h[2], h[3])
    assert step(conf, budget_three + 1e-4) == [True, False, True, True]
    assert step(conf, 100.0) == [True, True, True, True]
    assert step(conf, 0.0, num_transfer_tokens=2) == [True, False, True, False]  # at least num_transfer_tokens
    assert step(conf, 100.0, rows=([MASK, 5, MASK, MASK],)) == [True, False, True, True]  # decoded: not a candidate


@pytest.mark.parametrize("kw,msg", [
    ({"gamma": -0.1}, "gamma must be a finite number >= 0"),
    ({"gamma": float("inf")}, "gamma must be a finite number >= 0"),
    ({"num_transfer_tokens": 0}, "num_transfer_tokens must be an integer >= 1, got 0"),
    ({"threshold": 0.9}, "unknown parameter 'threshold' for strategy 'eb_sampler'"),
    ({"factor": 1.0}, "unknown parameter 'factor' for strategy 'eb_sampler'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_sampler("eb_sampler", Proposal.from_params(), **kw)


def test_batch_equals_each_prompt_alone(tiny_dir):
    from transformers import AutoTokenizer

    from lmeval_dllm.generate import GenerationConfig, generate
    from lmeval_dllm.models import load_model

    tok, model = AutoTokenizer.from_pretrained(tiny_dir), load_model(tiny_dir)
    prompts, ids, mask = left_pad(tok, ["What is 12+30?", "Hi", "A longer prompt!"])
    # the tiny model is nearly uniform (entropy ~ log V = 5.6 nats): gamma 6 lets two tokens through per step
    sampler = build_sampler("eb_sampler", Proposal.from_params(), gamma=6.0)
    cfg, stops = GenerationConfig(16, 8), torch.tensor([tok.eos_token_id])
    batch = generate(model, ids, mask, sampler, cfg, stop_token_ids=stops)
    assert (batch.committed > batch.nfe).all()  # several tokens per step
    for i, e in enumerate(prompts):
        alone = generate(model, torch.tensor([e]), None, sampler, cfg, stop_token_ids=stops)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist() and alone.nfe[0] == batch.nfe[i], f"row {i}"
