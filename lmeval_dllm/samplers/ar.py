"""Left-to-right (autoregressive-order) decoding inside a diffusion LLM: the ablation baseline.

The model stays the bidirectional dLLM (it sees the masks to the right); only the order is fixed, which isolates
the effect of the decoding order from the model. Each step commits the first ``num_transfer_tokens`` positions of
the block's leftmost contiguous run of masks, as the ``ar`` strategy of the reference research codebase
(Kamichanw/d2Cache, the code of arXiv:2509.23094) intends; there is no separate paper. With ``threshold``, the step
commits the longest prefix of that run whose scores are all >= threshold, and at least ``num_transfer_tokens``
(a parallel left-to-right decoder). Without ``threshold`` it commits exactly ``num_transfer_tokens``: the
reference port commits the whole run in one pass there (docs/strategies.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler
from lmeval_dllm.samplers.certainty_prior import apply_certainty_prior, check_sigma
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import check_threshold
from lmeval_dllm.state import DecodeState, StepOutput


def leading_run(candidates: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, L) bool: the first contiguous run of candidates in each row (empty if none)."""
    col = torch.arange(candidates.shape[-1], device=candidates.device)
    first = torch.where(candidates.any(-1), candidates.int().argmax(-1), candidates.shape[-1])  # (B,)
    before = col[None, :] < first[:, None]
    return torch.cumprod((candidates | before).long(), dim=-1).bool() & ~before


class LeftToRightSampler(Sampler):
    """Commit the leftmost masked positions of the block: ``num_transfer_tokens`` per step, or with
    ``threshold`` the longest left-contiguous run scoring >= threshold (at least ``num_transfer_tokens``).

    Args:
        proposal: token and confidence rule (the confidence only matters with ``threshold``).
        num_transfer_tokens: tokens per step (>= 1), or the least number with ``threshold``.
        threshold: confidence threshold of the run (in [0, 1]; <= 0 with ``alg=entropy``).
        sigma: certainty prior multiplied into the score compared with ``threshold`` (needs ``threshold``: the
            order itself is fixed).
    """

    name = "ar"

    def __init__(self, proposal: Proposal, *, num_transfer_tokens: int = 1, threshold: Optional[float] = None,
                 sigma: Optional[float] = None):
        super().__init__(proposal)
        if num_transfer_tokens < 1:
            raise ValueError(f"num_transfer_tokens must be an integer >= 1, got {num_transfer_tokens}")
        if threshold is not None:
            check_threshold("threshold", threshold, proposal)
        check_sigma(sigma, proposal.confidence)
        if sigma is not None and threshold is None:
            raise ValueError(f"sigma={sigma} has no effect on strategy 'ar' without threshold: the order is left to "
                             "right whatever the scores; give threshold too, or drop sigma")
        self.min_tokens_per_step, self.threshold, self.sigma = num_transfer_tokens, threshold, sigma

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        proposed = self.proposal(logits, state.generator)
        run = leading_run(state.candidates(state.block))  # (B, L)
        index_in_run = run.long().cumsum(-1) - 1  # (B, L): 0, 1, ... along the run
        commit = run & (index_in_run < self.min_tokens_per_step)
        if self.threshold is not None:
            scores = apply_certainty_prior(proposed.confidence, state, state.block, self.sigma)
            passing = (scores >= self.threshold) | ~run
            commit |= run & torch.cumprod(passing.long(), dim=-1).bool()  # the passing prefix of the run
        return StepOutput(commit=commit, tokens=proposed.tokens)
