"""Selection primitives (lmeval_dllm/samplers/base.py) on hand-built scores."""

from __future__ import annotations

import torch

from lmeval_dllm.samplers.base import factor_count, rank_desc, threshold_mask, top_k_mask

T, F = True, False


def test_rank_breaks_ties_by_lower_position():
    assert rank_desc(torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])).tolist() == [[2, 0, 3, 1, 4]]


def test_top_k_only_candidates_and_clamped():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    cand = torch.tensor([[F, T, T, F], [T, T, T, T]])
    assert top_k_mask(scores, cand, torch.tensor([5, 2])).tolist() == [[F, T, T, F], [F, F, T, T]]


def test_threshold_union_with_minimum():
    scores = torch.tensor([[0.95, 0.2, 0.91, 0.3], [0.5, 0.6, 0.2, 0.1]])
    cand = torch.ones(2, 4, dtype=torch.bool)
    got = threshold_mask(scores, cand, 0.9, torch.tensor([1, 2]))
    assert got.tolist() == [[T, F, T, F], [T, T, F, F]]
    # >= (not >): a score equal to the threshold is committed
    assert threshold_mask(torch.tensor([[0.9, 0.1]]), torch.ones(1, 2, dtype=torch.bool), 0.9,
                          torch.tensor([1])).tolist() == [[T, F]]


def test_factor_count():
    cand = torch.ones(1, 3, dtype=torch.bool)
    # bounds for factor 1: n=1 always, n=2: c >= 2/3, n=3: c >= 3/4
    assert factor_count(torch.tensor([[0.99, 0.9, 0.5]]), cand, 1.0).tolist() == [2]
    assert factor_count(torch.tensor([[0.99, 0.99, 0.99]]), cand, 1.0).tolist() == [3]  # all N, not N-1
    assert factor_count(torch.tensor([[0.1, 0.1, 0.1]]), cand, 1.0).tolist() == [1]
    # non-candidates never count
    assert factor_count(torch.tensor([[0.99, 0.99, 0.99]]), torch.tensor([[T, F, T]]), 1.0).tolist() == [2]
