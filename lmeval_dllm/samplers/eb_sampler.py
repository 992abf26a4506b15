"""EB-Sampler: entropy-bounded unmasking.

Ben-Hamu et al. 2025, "Accelerated Sampling from Masked Diffusion Models via Entropy Bounded Unmasking",
arXiv:2505.24857 (no official code release; this follows the paper's Algorithm 1). The masked positions are
ranked by an error proxy (here: the strategy's confidence, highest first), and the step commits the longest
ranked prefix U whose entropies satisfy::

    sum_{l in U} H(p_l) - max_{l in U} H(p_l) <= gamma

so a step commits many tokens when the model is nearly certain about them and one when it is not (the first
ranked token always passes: its sum minus its max is 0). The sum and the running maximum are taken per row,
along the ranked axis.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler, top_k_mask
from lmeval_dllm.samplers.certainty_prior import apply_certainty_prior, check_sigma
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.state import DecodeState, StepOutput


def entropy_bound_count(scores: torch.Tensor, entropy: torch.Tensor, candidates: torch.Tensor,
                        gamma: float) -> torch.Tensor:
    """Length of the longest prefix of the ranked candidates within the entropy budget.

    scores (B, L), entropy (B, L) nats, candidates (B, L) bool -> (B,) long. Ranking: scores descending, ties by
    the lower position. Rows are independent: cumulative sum and maximum run along the ranked axis of each row.
    """
    order = torch.sort(scores.masked_fill(~candidates, float("-inf")), dim=-1, descending=True, stable=True).indices
    ranked = entropy.gather(-1, order).masked_fill(~candidates.gather(-1, order), 0.0)  # (B, L), candidates first
    excess = ranked.cumsum(-1) - ranked.cummax(-1).values  # (B, L): sum minus max of each prefix
    within = torch.cumprod((excess <= gamma).long(), dim=-1).sum(-1)
    return torch.minimum(within, candidates.sum(-1))


class EntropyBoundSampler(Sampler):
    """Commit the longest confidence-ranked prefix of masked positions whose summed entropy, minus the largest,
    is at most ``gamma`` (arXiv:2505.24857, Alg. 1); at least ``num_transfer_tokens``.

    Args:
        proposal: token and confidence rule; the confidence ranks the positions (``alg=entropy`` ranks by entropy,
            the paper's entropy proxy). Entropies are those of the proposal's filtered distribution, in nats.
        gamma: the entropy budget (>= 0). 0 commits one token per step unless several have zero entropy;
            larger values commit more per step.
        num_transfer_tokens: the least number committed per step (>= 1).
        sigma: certainty prior multiplied into the ranking score (``certainty_prior.py``).
    """

    name = "eb_sampler"

    def __init__(self, proposal: Proposal, *, gamma: float = 0.001, num_transfer_tokens: int = 1,
                 sigma: Optional[float] = None):
        super().__init__(proposal)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0 (the entropy budget, in nats), got {gamma!r}")
        if num_transfer_tokens < 1:
            raise ValueError(f"num_transfer_tokens must be an integer >= 1, got {num_transfer_tokens}")
        check_sigma(sigma, proposal.confidence)
        self.gamma, self.min_tokens_per_step, self.sigma = gamma, num_transfer_tokens, sigma

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        proposed = self.proposal(logits, state.generator, need_probs=True)
        entropy = torch.special.entr(proposed.probs).sum(-1)  # (B, L): -sum p log p, 0 log 0 = 0
        scores = apply_certainty_prior(proposed.confidence, state, state.block, self.sigma)
        cand = state.candidates(state.block)
        count = entropy_bound_count(scores, entropy, cand, self.gamma).clamp(min=self.min_tokens_per_step)
        return StepOutput(commit=top_k_mask(scores, cand, count), tokens=proposed.tokens)
