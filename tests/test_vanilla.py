"""LowConfidenceSampler (lmeval_dllm/samplers/vanilla.py): one step on hand-built logits, schedules, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.state import DecodeState
from lmeval_dllm.samplers.vanilla import linear_schedule

MASK = 9


def state_with(block_tokens, prompt=(1, 2)):
    x = torch.tensor([list(prompt) + block_tokens])
    s = DecodeState(x=x, position_ids=torch.arange(x.shape[1])[None], attention_mask=None, prompt_len=len(prompt),
                    mask_token_id=MASK, stop_token_ids=torch.tensor([8]))
    s.block = slice(len(prompt), x.shape[1])
    s.active = torch.tensor([True])
    return s


def peaked(confidences, tokens, vocab=10):
    """(1, L, V) logits whose argmax is tokens[i] with softmax probability confidences[i]."""
    rows = []
    for c, t in zip(confidences, tokens):
        rest = (1 - c) / (vocab - 1)
        rows.append([math.log(c) if v == t else math.log(rest) for v in range(vocab)])
    return torch.tensor([rows])


def test_step_commits_only_masked_block_positions():
    s = state_with([MASK, 5, MASK, MASK])
    logits = peaked([0.99, 0.98, 0.5, 0.7], [3, 4, 5, 6])
    out = build_sampler("vanilla", Proposal.from_params(), num_transfer_tokens=2).step(logits, s)
    assert out.commit.tolist() == [[True, False, False, True]]  # position 1 is decoded: not a candidate
    assert out.tokens.tolist() == [[3, 4, 5, 6]]


def test_linear_schedule_matches_llada():
    assert linear_schedule(torch.tensor([10, 4]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 1]]
    assert linear_schedule(torch.tensor([32]), 8).tolist() == [[4] * 8]


@pytest.mark.parametrize("kw,msg", [
    ({"steps": 8, "num_transfer_tokens": 2}, "steps=8 and num_transfer_tokens=2 both set the per-step count"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"num_transfer_tokens": -1}, "num_transfer_tokens must be an integer >= 1, got -1"),
    ({"threshold": 0.9, "factor": 1.0}, "two parallel-decoding rules"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\] \(a probability\), got 1.5"),
    ({"threshold": -0.1}, r"threshold must be in \[0, 1\]"),
    ({"threshold": float("nan")}, "threshold must be a finite number, got nan"),
    ({"factor": 0.0}, "factor must be a finite number > 0, got 0.0"),
    ({"threshhold": 0.9}, "unknown parameter 'threshhold' for strategy 'vanilla'; did you mean 'threshold'"),
    ({"threshold": "high"}, r"threshold='high': expected a number or None"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_sampler("vanilla", Proposal.from_params(), **kw)


def test_entropy_threshold_range():
    with pytest.raises(ValueError, match="alg=entropy"):
        build_sampler("vanilla", Proposal.from_params(alg="entropy"), threshold=0.5)
    build_sampler("vanilla", Proposal.from_params(alg="entropy"), threshold=-0.5)


def test_steps_must_fit_the_blocks():
    s = build_sampler("vanilla", Proposal.from_params(), steps=10)
    with pytest.raises(ValueError, match=r"steps=10 must be at most gen_length=16 and divisible by the number of "
                                         r"blocks \(16 // block_length=4 = 4\)"):
        s.validate_lengths(16, 4)
    s.validate_lengths(20, 10)
    with pytest.raises(ValueError, match="steps=10 must be at most gen_length=8"):
        s.validate_lengths(8, 8)


def test_unknown_strategy_suggests():
    with pytest.raises(ValueError, match="unknown strategy 'vanila'; did you mean 'vanilla'\\? available: vanilla"):
        build_sampler("vanila", Proposal.from_params())

