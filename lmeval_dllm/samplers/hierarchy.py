"""dInfer's hierarchical decoding (Ma et al., "dInfer: An Efficient Inference Framework for Diffusion Language
Models", arXiv:2510.08666; inclusionAI/dInfer ``python/dinfer/decoding/parallel_strategy.py::HierarchyDecoder``).

The masked positions of the block split into contiguous runs (maximal stretches of masks between decoded
tokens). Each step commits, in every run, its most confident position if that confidence is above
``low_threshold``; every position whose confidence is above ``threshold``; and the most confident position of the
block in any case (so each step commits at least one token). Committing one token per run spreads the tokens a
step decodes over the block instead of clustering them, which keeps neighbouring tokens from being decided
together without seeing each other.

Deviations from the released code (docs/strategies.md):

- Batches: the release asserts batch size 1; here every operation is per row (a cumulative sum names the runs, a
  scatter-max finds each run's best), so a batch gives each row what it gives alone.
- Ties: the block's best position is the lowest of those tied (as the release's ``torch.argmax``); positions
  tied for their run's best all commit, as in the release (it compares with ``==``).
- The confidence is the proposal's (``softmax`` then gather, float32); the release exponentiates
  ``log_softmax``, which rounds differently by a few ulps near 1.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler, top_k_mask
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import check_threshold
from lmeval_dllm.state import DecodeState, StepOutput


def run_best(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the candidates that hold the highest score of their contiguous run of candidates.

    scores (B, L) float, candidates (B, L) bool. A run starts where a candidate follows a non-candidate; a
    cumulative sum of the starts numbers the runs of each row, and a scatter-max gives each run's best.
    """
    B, L = candidates.shape
    before = torch.cat([candidates.new_zeros(B, 1), candidates[:, :-1]], dim=1)
    run_id = (candidates & ~before).long().cumsum(-1).sub(1).clamp(min=0)  # (B, L): the run each position is in
    masked = scores.masked_fill(~candidates, float("-inf"))
    best = masked.new_full((B, L), float("-inf")).scatter_reduce(1, run_id, masked, reduce="amax")  # (B, runs)
    return candidates & (masked == best.gather(1, run_id))


class HierarchySampler(Sampler):
    """Commit each contiguous masked run's best position above ``low_threshold``, every position above
    ``threshold``, and the block's best position.

    Args:
        proposal: token and confidence rule (temperature, remasking / alg, EOS options).
        threshold: commit every candidate whose confidence is strictly above it (the release's ``threshold``;
            its benchmarks use 0.8 and 0.9). None (the release's default): off.
        low_threshold: a run's best position commits only if its confidence is strictly above it (the release's
            default 0.4; its benchmark scripts default to 0.3 and use 0.5 or 0.7). None: every run's best commits.
    """

    name = "hierarchy"

    def __init__(self, proposal: Proposal, *, threshold: Optional[float] = None,
                 low_threshold: Optional[float] = 0.4):
        super().__init__(proposal)
        for name, value in (("threshold", threshold), ("low_threshold", low_threshold)):
            if value is not None:
                check_threshold(name, value, proposal)
        self.threshold = threshold
        self.low_threshold = low_threshold

    def step_budget(self, block_length: int) -> int:
        return block_length  # the block's best position commits at every step

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        proposed = self.proposal(logits, state.generator)
        conf, cand = proposed.confidence, state.candidates(state.block)  # (B, L), (B, L)
        commit = run_best(conf, cand)
        if self.low_threshold is not None:
            commit &= conf > self.low_threshold
        if self.threshold is not None:
            commit |= cand & (conf > self.threshold)
        commit |= top_k_mask(conf, cand, torch.ones_like(cand[:, 0], dtype=torch.long))
        return StepOutput(commit=commit, tokens=proposed.tokens)
