"""KLASS: KL-adaptive stability sampling.

Kim et al. 2025, "KLASS: KL-Guided Fast Inference in Masked Diffusion Models", arXiv:2511.05664 (NeurIPS 2025);
code shkim0116/KLASS (``src/model/llada_klass.py::stable_confident_decode``, ``src/model/dream_klass.py``).
A masked position is *ready* when its predictive distribution has settled and is confident::

    KL(p_t || p_{t-1}) < kl_threshold at each of the last kl_history_length steps,  and  conf > threshold

Every ready position of the block is committed at once; when none is, the step falls back to the usual top-n
by confidence (``steps`` / ``num_transfer_tokens``, one token per step by default), so KLASS never stalls and never
silently degenerates to vanilla: its confidence gate ``threshold`` is always set (default 0.9, the release's
``conf_threshold`` default).

Memory: the release keeps p_{t-1} for every position of the canvas in float64 (B x T x V). Only two blocks are
ever read: the current block (its KL at every step) and the next one (its distribution at the last step of this
block is the p_{t-1} of its first step), so we keep (B, 2 * block_length, V), in float32 (see ``confidence_dtype``).

Deviations from the release (docs/strategies.md): ties go to the lower position; a block is decoded to the end
(the release may leave masks when ready sets commit fewer than its fixed schedule); one rule for LLaDA and Dream.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch

from lmeval_dllm.samplers.base import top_k_mask
from lmeval_dllm.samplers.certainty_prior import apply_certainty_prior
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler, check_threshold
from lmeval_dllm.state import DecodeState, StepOutput

KL_EPS = 1e-12  # the release's epsilon inside both logs


def kl_divergence(p: torch.Tensor, q: Optional[torch.Tensor]) -> torch.Tensor:
    """KL(p || q) over the last axis, as the release computes it: sum p (log(p + eps) - log(q + eps)).

    p, q (B, L, V) -> (B, L). ``q`` None (no previous distribution yet) gives +inf: never stable.
    """
    if q is None:
        return torch.full(p.shape[:-1], float("inf"), device=p.device)
    return (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(-1)


class KLAdaptiveStabilitySampler(LowConfidenceSampler):
    """Commit every masked position of the block whose distribution was stable (KL below ``kl_threshold``) over the
    last ``kl_history_length`` steps and whose confidence exceeds ``threshold``; if none, the top-n by confidence.

    Args:
        proposal: token and confidence rule; KL is measured on its (tempered, filtered) distribution.
        steps, num_transfer_tokens: the fallback's per-step count, as in ``vanilla`` (default one per step).
        threshold: KLASS's confidence gate ``conf_threshold`` (strict ``>``; default 0.9; in [0, 1]).
        kl_threshold: KLASS's stability gate (strict ``<``; > 0; default 0.01).
        kl_history_length: steps over which the KL must stay below ``kl_threshold`` (>= 1; default 2).
        sigma: certainty prior multiplied into the confidence before both the gate and the fallback ranking.

    Per-call memory (``state.sampler_state``): ``p_prev`` (B, W, V) float32, the distributions of the current
    and next block at the row's last active step; ``kl_history`` (B, L, H).
    """

    name = "klass"
    # The release computes both in float64. The confidence needs it: near 1, float32 rounds distinct confidences to a
    # tie, which changes the order (the main source of differences from the release in our parity runs with float32
    # confidences; docs/strategies.md). The KL values compared with kl_threshold do not (identical results with
    # float32 and float64 distributions in the 90 parity settings where we compared them), so the distributions kept
    # between steps are float32: half the memory.
    confidence_dtype: ClassVar[torch.dtype] = torch.float64
    distribution_dtype: ClassVar[torch.dtype] = torch.float32
    logits_span = "generation"  # the next block's distributions are needed at every step (see module docstring)

    def __init__(
        self,
        proposal: Proposal,
        *,
        steps: Optional[int] = None,
        num_transfer_tokens: Optional[int] = None,
        threshold: float = 0.9,
        kl_threshold: float = 0.01,
        kl_history_length: int = 2,
        sigma: Optional[float] = None,
    ):
        super().__init__(proposal, steps=steps, num_transfer_tokens=num_transfer_tokens, sigma=sigma)
        check_threshold("threshold", threshold, proposal)
        if not (math.isfinite(kl_threshold) and kl_threshold > 0):
            raise ValueError(f"kl_threshold must be a finite number > 0, got {kl_threshold!r}")
        if kl_history_length < 1:
            raise ValueError(f"kl_history_length must be an integer >= 1, got {kl_history_length}")
        # LowConfidenceSampler reads self.threshold as Fast-dLLM's rule; KLASS has its own step, so the name is free.
        self.threshold, self.kl_threshold, self.history_length = threshold, kl_threshold, kl_history_length

    def begin_block(self, state: DecodeState) -> None:
        super().begin_block(state)
        mem, L = state.sampler_state, state.block.stop - state.block.start
        window = min(2 * L, state.x.shape[1] - state.block.start)
        prev = mem.get("p_prev")
        if prev is not None:  # last block's "next block" part is this block's p_{t-1}
            carried = prev.new_zeros(prev.shape[0], window, prev.shape[-1])
            carried[:, :L] = prev[:, L:2 * L]
            mem["p_prev"] = carried
        mem["kl_history"] = None  # entries from an earlier block are never read (see the gate in step)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        mem = state.sampler_state
        B, G, _ = logits.shape
        start, L = state.block.start - state.prompt_len, state.block.stop - state.block.start
        # The loop hands over the generation region in the model's dtype: only the rows read here are converted.
        proposed = self.proposal(logits[:, start:start + 2 * L].float(), state.generator, need_probs=True,
                                 dtype=self.confidence_dtype)  # block + next
        probs = proposed.probs.to(self.distribution_dtype)  # (B, W, V)
        prev = mem.get("p_prev")

        kl = kl_divergence(probs[:, :L], None if prev is None else prev[:, :L])  # (B, L)
        old_history = history = mem.get("kl_history")
        if history is None:
            history = kl.new_full((B, L, self.history_length), float("inf"))
        history = torch.cat([history[..., 1:], kl[..., None]], dim=-1)  # (B, L, H), newest last
        # As in the release, a position can only be stable once the block has made H steps: every KL read is then
        # measured inside this block (the first one against the previous block's last step).
        if state.step_in_block >= self.history_length - 1:
            stable = (history < self.kl_threshold).all(-1)
        else:
            stable = torch.zeros_like(kl, dtype=torch.bool)

        conf = apply_certainty_prior(proposed.confidence[:, :L], state, state.block, self.sigma)  # (B, L)
        cand = state.candidates(state.block)
        ready = cand & stable & (conf > self.threshold)
        fallback = top_k_mask(conf, cand, self.min_count(state))
        commit_block = torch.where(ready.any(-1, keepdim=True), ready, fallback)

        # Memory moves on only where this step saw a real prediction: rows that sat out the step keep theirs (a row
        # decodes the same alone or in a batch), and so do columns a cache did not recompute (their logits are
        # placeholders; the KL then compares with the column's last recomputed distribution).
        W = probs.shape[1]
        seen = torch.ones(B, W, dtype=torch.bool, device=kl.device)  # (B, W)
        if state.active is not None:
            seen = seen & state.active[:, None]
        if state.fresh is not None:
            seen = seen & state.fresh[:, state.block.start:state.block.start + W]
        mem["p_prev"] = probs if prev is None else torch.where(seen[..., None], probs, prev)
        mem["kl_history"] = history if old_history is None else torch.where(seen[:, :L, None], history, old_history)

        commit = torch.zeros(B, G, dtype=torch.bool, device=logits.device)
        commit[:, start:start + L] = commit_block
        tokens = torch.zeros(B, G, dtype=torch.long, device=logits.device)
        tokens[:, start:start + L] = proposed.tokens[:, :L]
        return StepOutput(commit=commit, tokens=tokens)
