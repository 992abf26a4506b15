"""LLaDA low-confidence remasking with semi-autoregressive blocks, and Fast-dLLM's parallel decoding.

- LLaDA (Nie et al., arXiv:2502.09992, Alg. 5; ML-GSAI/LLaDA ``generate.py``): each step commits the most
  confident masked positions of the current block. ``steps`` is the total budget, split evenly over blocks;
  inside a block the number committed at step i follows the linear schedule ``get_num_transfer_tokens``:
  ``m // s`` tokens, plus one for the first ``m % s`` steps (m masks, s steps per block). Alternatively
  ``num_transfer_tokens`` = n commits n per step (``steps = gen_length / n`` when n divides ``block_length``).
- Dream (Ye et al., arXiv:2508.15487; DreamLM/Dream ``generation_utils.py``, ``diffusion_generate``):
  ``schedule=dream`` takes the count from Dream's time grid instead, ``t_i = linspace(1, eps, s + 1)``: step i
  commits ``floor(m * (1 - t_(i+1) / t_i))`` of the m masks still in the block (0 is possible), and the last step
  commits every remaining one. With ``block_length = gen_length`` and ``alg`` set this is Dream's
  ``diffusion_generate`` (the recipe of Dream-Coder and DiffuCoder).
- Fast-dLLM (Wu et al., arXiv:2505.22618; NVlabs/Fast-dLLM ``llada/generate.py``): ``threshold`` commits every
  candidate whose confidence is >= threshold; ``factor`` commits the longest prefix of the ranked candidates
  with c_(n) >= 1 - factor / (n + 1). Both commit at least the schedule's count (at least one token).
- ``sigma`` (d2Cache's certainty prior, ``certainty_prior.py``) multiplies the confidence by the density of decoded
  positions around each position; ranking, threshold and factor then apply to that product.

Deviations from the released code (docs/strategies.md): ties are broken by the lower position (torch.topk's
order is unspecified); the factor rule commits exactly the accepted prefix (the released code also commits the
last candidate when only that one fails the bound); confidences are float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler, factor_count, threshold_mask, top_k_mask
from lmeval_dllm.samplers.certainty_prior import apply_certainty_prior, check_sigma
from lmeval_dllm.samplers.proposal import Proposal, Proposed
from lmeval_dllm.state import DecodeState, StepOutput


def linear_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: masked (B,) counts -> (B, steps) tokens per step, the remainder
    going to the earliest steps."""
    base, rem = masked // steps, masked % steps
    i = torch.arange(steps, device=masked.device)
    return base[:, None] + (i[None, :] < rem[:, None]).long()


SCHEDULES = ("linear", "dream")


def dream_count(masked: torch.Tensor, timesteps: torch.Tensor, i: int) -> torch.Tensor:
    """Dream's per-step count: masked (B, L) bool, timesteps (s + 1,) float32 -> (B,) long.

    ``int(m * (1 - t[i+1] / t[i]))`` in float32 (the release's arithmetic, so the counts round alike) for the m
    masks left; every one of them at the last step. The release averages m over the batch; its rows always hold
    the same number of masks, so the per-row count is the same number, and a batch equals each row alone."""
    m = masked.sum(-1)
    if i >= timesteps.shape[0] - 2:
        return m
    return (m.float() * (1 - timesteps[i + 1] / timesteps[i])).long()


class LowConfidenceSampler(Sampler):
    """Commit the most confident masked positions of the block: top-n, or Fast-dLLM threshold / factor.

    Args:
        proposal: token and confidence rule (temperature, top_p, top_k, remasking / alg, EOS options).
        steps: total number of steps over the whole generation (LLaDA); divisible by the number of blocks,
            at most ``gen_length``. Mutually exclusive with ``num_transfer_tokens``.
        num_transfer_tokens: tokens committed per step (default 1 when ``steps`` is not given).
        threshold: Fast-dLLM confidence threshold in [0, 1]; commits every candidate at or above it.
        factor: Fast-dLLM factor (> 0); mutually exclusive with ``threshold``.
        sigma: certainty prior (d2Cache, ``samplers/certainty_prior.py``): the confidence is multiplied by the
            density of decoded positions around each position before ranking and thresholding. None = off.
        schedule: how ``steps`` turns into per-step counts: ``linear`` (LLaDA's ``get_num_transfer_tokens``,
            the default) or ``dream`` (Dream's ``diffusion_generate`` time grid; needs ``steps``).
        eps: the last time of Dream's grid (``linspace(1, eps, steps + 1)``; Dream's default 1e-3); only with
            ``schedule=dream``.

    With ``threshold`` or ``factor``, ``steps`` / ``num_transfer_tokens`` give the minimum committed per step.
    """

    name = "vanilla"

    def __init__(
        self,
        proposal: Proposal,
        *,
        steps: Optional[int] = None,
        num_transfer_tokens: Optional[int] = None,
        threshold: Optional[float] = None,
        factor: Optional[float] = None,
        sigma: Optional[float] = None,
        schedule: str = "linear",
        eps: Optional[float] = None,
    ):
        super().__init__(proposal)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule == "dream" and steps is None:
            raise ValueError("schedule=dream needs steps (the number of points of Dream's time grid per block); "
                             f"got num_transfer_tokens={num_transfer_tokens}")
        if eps is not None and schedule != "dream":
            raise ValueError(f"eps={eps} is the end of Dream's time grid and only applies with schedule=dream "
                             f"(schedule={schedule!r})")
        eps = 1e-3 if eps is None else eps
        if not (math.isfinite(eps) and 0.0 < eps < 1.0):
            raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
        if steps is not None and num_transfer_tokens is not None:
            raise ValueError(
                f"steps={steps} and num_transfer_tokens={num_transfer_tokens} both set the per-step count; give one "
                "(steps = total budget with LLaDA's linear schedule, num_transfer_tokens = tokens per step)"
            )
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        if num_transfer_tokens is not None and num_transfer_tokens < 1:
            raise ValueError(f"num_transfer_tokens must be an integer >= 1, got {num_transfer_tokens}")
        if threshold is not None and factor is not None:
            raise ValueError(f"threshold={threshold} and factor={factor} are two parallel-decoding rules; give one")
        if threshold is not None:
            check_threshold("threshold", threshold, proposal)
        if factor is not None and not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
        check_sigma(sigma, proposal.confidence)
        self.steps = steps
        self.num_transfer_tokens = num_transfer_tokens if steps is None else None
        self.threshold = threshold
        self.factor = factor
        self.sigma = sigma
        self.schedule = schedule
        self.eps = float(eps)

    def validate_lengths(self, gen_length: int, block_length: int) -> None:
        if self.steps is None:
            return
        n_blocks = gen_length // block_length
        if self.steps > gen_length or self.steps % n_blocks:
            raise ValueError(
                f"steps={self.steps} must be at most gen_length={gen_length} and divisible by the number of blocks "
                f"({gen_length} // block_length={block_length} = {n_blocks})"
            )

    def begin_block(self, state: DecodeState) -> None:
        if self.steps is not None:
            blocks = state.budget_blocks or state.gen_length // (state.block.stop - state.block.start)
            per_block = self.steps // blocks
            if self.schedule == "dream":
                # float32, on the canvas's device, as Dream's diffusion_generate builds it
                state.sampler_state["timesteps"] = torch.linspace(1, self.eps, per_block + 1, device=state.x.device)
                return
            masked = (state.x[:, state.block] == state.mask_token_id).sum(-1)
            state.sampler_state["schedule"] = linear_schedule(masked, per_block)  # (B, s)

    def min_count(self, state: DecodeState) -> torch.Tensor:
        """(B,) the least number of tokens this step commits (before clamping to the candidates)."""
        if self.steps is None:
            return torch.full((state.batch_size,), self.num_transfer_tokens or 1, device=state.x.device)
        if self.schedule == "dream":
            return dream_count(state.x[:, state.block] == state.mask_token_id, state.sampler_state["timesteps"],
                               state.step_in_block)
        schedule = state.sampler_state["schedule"]
        return schedule[:, min(state.step_in_block, schedule.shape[1] - 1)].clamp(min=1)

    def scores(self, logits: torch.Tensor, proposed: Proposed, state: DecodeState) -> torch.Tensor:
        """(B, L) selection scores of the block: the confidence, times the certainty density if ``sigma``.
        Strategies that calibrate the confidence (PC-Sampler) override this."""
        return apply_certainty_prior(proposed.confidence, state, state.block, self.sigma)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        proposed = self.proposal(logits, state.generator)
        conf, cand = self.scores(logits, proposed, state), state.candidates(state.block)
        n = self.min_count(state)
        if self.threshold is not None:
            commit = threshold_mask(conf, cand, self.threshold, n)
        elif self.factor is not None:
            commit = top_k_mask(conf, cand, torch.maximum(factor_count(conf, cand, self.factor), n))
        else:
            commit = top_k_mask(conf, cand, n)
        return StepOutput(commit=commit, tokens=proposed.tokens)


def check_threshold(name: str, value: float, proposal: Proposal) -> None:
    """A confidence threshold must be a finite number in the range the confidence can take."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if proposal.confidence == "entropy":
        if value > 0:
            raise ValueError(f"{name}={value}: with alg=entropy the confidence is a negative entropy (<= 0); "
                             f"use a threshold <= 0")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a probability), got {value!r}")
