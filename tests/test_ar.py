"""LeftToRightSampler (lmeval_dllm/samplers/ar.py): left-to-right commits on hand-built logits, the reference port's
whole-block bug (spec §14.1) as a regression test, thresholded runs, errors."""

from __future__ import annotations

import pytest
import torch
from samplers_support import MASK, peaked, state_with
from scripted import EOS, EOT, ScriptedModel

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.ar import leading_run

T, F = True, False


def step(conf, rows=([MASK] * 4,), **kw):
    sampler = build_sampler("ar", Proposal.from_params(), **kw)
    batch = len(rows)
    logits = peaked([list(conf)] * batch, [[3, 4, 5, 6]] * batch)
    return sampler.step(logits, state_with(rows)).commit.tolist()


def test_without_threshold_commits_num_transfer_tokens_not_the_block():
    """Spec §14.1: the reference port commits the whole contiguous masked run (the whole block) in one pass."""
    assert step([0.1, 0.2, 0.99, 0.3]) == [[T, F, F, F]]  # the leftmost, whatever the confidences
    assert step([0.1, 0.2, 0.99, 0.3], num_transfer_tokens=2) == [[T, T, F, F]]
    assert step([0.1, 0.2, 0.99, 0.3], num_transfer_tokens=9) == [[T, T, T, T]]


def test_run_starts_at_the_first_mask_and_stops_at_the_first_decoded():
    assert leading_run(torch.tensor([[F, T, T, F, T], [F, F, F, F, F], [T, T, T, T, T]])).tolist() == [
        [F, T, T, F, F], [F, F, F, F, F], [T, T, T, T, T]]
    assert step([0.9] * 4, rows=([5, MASK, 6, MASK],), num_transfer_tokens=3) == [[F, T, F, F]]


def test_threshold_commits_the_passing_prefix_of_the_run():
    assert step([0.95, 0.91, 0.3, 0.99], threshold=0.9) == [[T, T, F, F]]  # stops at 0.3 although 0.99 passes
    assert step([0.3, 0.95, 0.95, 0.95], threshold=0.9) == [[T, F, F, F]]  # at least num_transfer_tokens
    assert step([0.3, 0.95, 0.95, 0.95], threshold=0.9, num_transfer_tokens=2) == [[T, T, F, F]]
    assert step([0.95, 0.95, 0.3, 0.3], threshold=0.9, num_transfer_tokens=3) == [[T, T, T, F]]
    assert step([0.9, 0.9, 0.9, 0.9], threshold=0.9) == [[T, T, T, T]]  # >=
    # rows are independent
    assert step([0.95, 0.91, 0.3, 0.99], rows=([MASK] * 4, [5, MASK, MASK, MASK]), threshold=0.9) == [
        [T, T, F, F], [F, T, F, F]]


def test_decoding_order_is_left_to_right_block_by_block():
    targets, scores = [[10] * 8], [[1.0, 2.0, 9.0, 3.0, 9.0, 1.0, 1.0, 1.0]]

    def run(**kw):
        sampler = build_sampler("ar", Proposal.from_params(), **kw)
        return generate(ScriptedModel(targets, scores), torch.tensor([[1, 2]]), None, sampler, GenerationConfig(8, 4),
                        stop_token_ids=torch.tensor([EOS, EOT]))

    out = run()
    assert out.decoded_at[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and out.steps == 8
    # conf(9.0) = 0.9966, conf(3.0) = 0.393: threshold 0.35 passes position 3 but not 0-1 -> one at a time there
    assert run(threshold=0.35).decoded_at[0].tolist() == [0, 1, 2, 2, 3, 4, 5, 6]
    assert run(threshold=0.0).decoded_at[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("kw,msg", [
    ({"num_transfer_tokens": 0}, "num_transfer_tokens must be an integer >= 1, got 0"),
    ({"threshold": 1.2}, r"threshold must be in \[0, 1\]"),
    ({"sigma": 10.0}, "sigma=10.0 has no effect on strategy 'ar' without threshold"),
    ({"factor": 1.0}, "unknown parameter 'factor' for strategy 'ar'"),
    ({"debias": True}, "unknown parameter 'debias' for strategy 'ar'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_sampler("ar", Proposal.from_params(), **kw)
