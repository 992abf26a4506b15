"""HierarchySampler (lmeval_dllm/samplers/hierarchy.py): each contiguous masked run's best above low_threshold,
everything above threshold, the block's best in any case; on hand-built logits, then through the decode loop."""

from __future__ import annotations

import pytest
import torch
from batches import assert_each_row_as_alone, left_pad, tiny
from samplers_support import MASK, peaked, state_with

from lmeval_dllm.caches import build_cache
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.hierarchy import run_best

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]


def sampler(**kw):
    return build_sampler("hierarchy", Proposal.from_params(), **kw)


def test_run_best_picks_the_best_of_each_contiguous_run():
    scores = torch.tensor([[0.5, 0.7, 0.1, 0.9, 0.3, 0.2, 0.6]])
    cand = torch.tensor([[True, True, False, True, True, False, True]])  # runs: {0, 1}, {3, 4}, {6}
    assert run_best(scores, cand).tolist() == [[False, True, False, True, False, False, True]]
    # ties inside a run all win (the release compares with ==); rows are independent
    scores = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.3, 0.2]])
    cand = torch.tensor([[True, True, True], [True, False, True]])
    assert run_best(scores, cand).tolist() == [[True, True, False], [True, False, True]]


def test_one_token_per_run_above_low_threshold():
    # block: M M 5 M M M 6 M ; runs {0,1}, {3,4,5}, {7}
    s = state_with([[MASK, MASK, 5, MASK, MASK, MASK, 6, MASK]])
    conf = [0.45, 0.6, 0.99, 0.35, 0.5, 0.7, 0.99, 0.3]
    out = sampler(low_threshold=0.4).step(peaked(conf, [1, 2, 3, 4, 5, 6, 7, 3]), s)
    # run {7}: its best (0.3) is not above 0.4; the block's best is 0.7 (position 5), already a run best
    assert out.commit.tolist() == [[False, True, False, False, False, True, False, False]]
    assert out.tokens[0, [1, 5]].tolist() == [2, 6]


def test_high_threshold_adds_every_confident_position_and_the_best_always_commits():
    s = state_with([[MASK] * 5])  # one run
    conf = [0.95, 0.92, 0.3, 0.91, 0.2]
    out = sampler(threshold=0.9, low_threshold=0.4).step(peaked(conf, [1, 2, 3, 4, 5]), s)
    assert out.commit.tolist() == [[True, True, False, True, False]]
    # nothing above either threshold: the block's best (lowest position among equals) still commits
    s = state_with([[MASK, MASK, 7, MASK]])
    out = sampler(threshold=0.9, low_threshold=0.5).step(peaked([0.2, 0.3, 0.99, 0.3], [1, 2, 3, 4]), s)
    assert out.commit.tolist() == [[False, True, False, False]]


def test_thresholds_are_strict_and_none_turns_them_off():
    s = state_with([[MASK, 5, MASK]])
    conf = [0.5, 0.9, 0.4]
    assert sampler(low_threshold=0.4).step(peaked(conf, [1, 2, 3]), s).commit.tolist() == [[True, False, False]]
    assert sampler(low_threshold=None).step(peaked(conf, [1, 2, 3]), s).commit.tolist() == [[True, False, True]]
    s = state_with([[MASK, MASK, MASK]])
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])  # confidences 0.5 (exactly), 0.73, 0.5
    out = sampler(threshold=0.5, low_threshold=0.99).step(logits, s)
    assert out.commit.tolist() == [[False, True, False]]  # 0.5 is not above 0.5


def test_rows_of_a_batch_are_independent():
    blocks = [[MASK, MASK, 5, MASK], [MASK, 4, MASK, MASK]]
    conf = [[0.5, 0.6, 0.9, 0.45], [0.2, 0.9, 0.8, 0.7]]
    tokens = [[1, 2, 3, 4], [5, 6, 7, 8]]
    batch = sampler().step(peaked(conf, tokens), state_with(blocks))
    for i in range(2):
        alone = sampler().step(peaked(conf[i], tokens[i]), state_with([blocks[i]]))
        assert batch.commit[i].tolist() == alone.commit[0].tolist()
    assert batch.commit.tolist() == [[False, True, False, True], [False, False, True, False]]  # 0.2 < low_threshold


@pytest.mark.parametrize("kw,msg", [
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
    ({"low_threshold": -0.1}, r"low_threshold must be in \[0, 1\]"),
    ({"low_threshold": float("nan")}, "low_threshold must be a finite number"),
    ({"low_thresh": 0.3}, "unknown parameter 'low_thresh' for strategy 'hierarchy'; did you mean 'low_threshold'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        sampler(**kw)


def run(model, ids, mask, cache=None, **kw):
    return generate(model, ids, mask, sampler(**kw), GenerationConfig(16, 8), stop_token_ids=torch.tensor([999]),
                    cache=build_cache(*cache) if cache else None)


@pytest.mark.parametrize("cache", [None, ("prefix", ), ("dual", ), ("vicinity", )])
def test_batch_equals_each_prompt_alone(tiny_dir, cache):
    """A left-padded batch gives each row what its prompt gives alone (the release runs batch size 1 only)."""
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    kw = {"threshold": 0.05, "low_threshold": None}  # random tiny weights: low confidences
    batch = run(model, ids, mask, cache, **kw)
    assert (batch.tokens != model.mask_token_id).all()
    assert (batch.nfe < 16).any()  # several tokens per step somewhere: the rule is exercised
    assert_each_row_as_alone(batch, enc, lambda x: run(model, x, None, cache, **kw), cache)
