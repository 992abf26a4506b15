"""dInfer's credit decoding (Ma et al., "dInfer", arXiv:2510.08666; inclusionAI/dInfer
``python/dinfer/decoding/parallel_strategy.py::CreditThresholdParallelDecoder``).

A position whose top-1 token stays the same over several steps has earned credit for it. Each block keeps a
credit matrix C (B, L, V), zero at the block's start; every step

1. decays it, ``C <- decay_beta * C`` (not at the block's first step),
2. adds ``p_top1 ** boost_gamma`` at each masked position's current top-1 token (p = the softmax of the raw
   logits),
3. fuses it into the logits, ``logits + credit_alpha * log(C + 1)``,

and then decodes the fused logits with dInfer's threshold rule: every candidate whose confidence (read from the
fused logits) is at least ``min(threshold, c_max - 1e-5)``, c_max the row's highest, so a step commits the
positions above the threshold or, when there are none, the best one (and any within 1e-5 of it). A candidate
whose proposed token is the mask token is not committed (the release's ``rm_mask``).

Deviations from the released code (docs/strategies.md): the matrix lives in ``state.sampler_state`` and is reset
at every block start (the release keys it by the block's columns and clears it when the canvas has no mask
left, which is the same for one call); it is updated only at candidates (masked positions of active rows whose
logits are this step's).
"""

from __future__ import annotations

import math

import torch

from lmeval_dllm.samplers.base import Sampler
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import check_threshold
from lmeval_dllm.state import DecodeState, StepOutput


def dinfer_threshold_mask(scores: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """dInfer's ``get_transfer_index_threshold``: candidates scoring at least ``min(threshold, best - 1e-5)``.

    scores (B, L) float, candidates (B, L) bool -> (B, L) bool. A row without candidates commits nothing.
    """
    masked = scores.masked_fill(~candidates, float("-inf"))
    bar = (masked.max(-1, keepdim=True).values - 1e-5).clamp(-1000.0, threshold)  # (B, 1)
    return candidates & (masked >= bar)


class CreditSampler(Sampler):
    """Threshold decoding of logits fused with a decaying credit for each position's recurring top-1 token.

    Args:
        proposal: token and confidence rule, applied to the fused logits.
        threshold: commit every candidate whose fused confidence is at least this (the release has no default;
            its benchmark scripts default to 0.9).
        credit_alpha: weight of ``log(C + 1)`` added to the logits (release default 0.7).
        boost_gamma: exponent of the top-1 probability added to the credit (release default 0.2).
        decay_beta: factor the credit decays by at every step after a block's first (release default 0.8).

    Memory: the credit matrix is (B, block_length, V) float32 (the release's layout): 16 x 32 x 126464 x 4 bytes
    = 259 MB for LLaDA at batch 16.
    """

    name = "credit"

    def __init__(self, proposal: Proposal, *, threshold: float = 0.9, credit_alpha: float = 0.7,
                 boost_gamma: float = 0.2, decay_beta: float = 0.8):
        super().__init__(proposal)
        check_threshold("threshold", threshold, proposal)
        for name, value in (("credit_alpha", credit_alpha), ("boost_gamma", boost_gamma)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(decay_beta) and 0 <= decay_beta <= 1):
            raise ValueError(f"decay_beta must be in [0, 1], got {decay_beta!r}")
        self.threshold = threshold
        self.credit_alpha = credit_alpha
        self.boost_gamma = boost_gamma
        self.decay_beta = decay_beta

    def begin_block(self, state: DecodeState) -> None:
        state.sampler_state["credit"] = None

    def fuse(self, logits: torch.Tensor, candidates: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """logits (B, L, V) float32 -> the credit-fused logits; updates the block's credit matrix."""
        credit = state.sampler_state.get("credit")
        if credit is None or credit.shape != logits.shape:
            credit = torch.zeros_like(logits, dtype=torch.float32)
        else:
            credit.mul_(self.decay_beta)
        top1_p, top1_ids = torch.softmax(logits.float(), dim=-1).max(-1)  # (B, L)
        boost = top1_p.pow(self.boost_gamma) * candidates
        credit.scatter_add_(2, top1_ids[..., None], boost[..., None])
        state.sampler_state["credit"] = credit
        return logits + self.credit_alpha * torch.log(credit + 1)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        cand = state.candidates(state.block)  # (B, L)
        proposed = self.proposal(self.fuse(logits, cand, state), state.generator)
        cand = cand & (proposed.tokens != state.mask_token_id)
        return StepOutput(commit=dinfer_threshold_mask(proposed.confidence, cand, self.threshold),
                          tokens=proposed.tokens)
