"""PC-Sampler: position-aware, frequency-calibrated confidence.

Huang et al. 2025, "PC-Sampler: Position-Aware Calibration of Decoding Bias in Masked Diffusion Models",
arXiv:2508.13021; code NEUIR/PC-Sampler (``src/generate.py``: ``pc_sampler_function``,
``generate_with_pc_sampler``). Each masked position i of the block scores::

    score_i = exp(-lambd * i) * min(-p_i * log(f(x_i) + 1e-9), clip_alpha)

with p_i the confidence of its proposed token x_i, f the background frequency of that token in a reference corpus
(``frequency_table.py``) and i the offset inside the current block (the release's ``torch.arange(block_length)``;
with one block, as in all of the paper's runs, this is the paper's i - |prompt|). The first factor is the
paper's position-aware weighting ("global trajectory control"), the second its calibrated confidence, which holds
back frequent, trivial tokens. The step then commits the top-scoring positions as LLaDA does (``steps`` /
``num_transfer_tokens``), or Fast-dLLM's threshold on the score.

Deviations from the release (docs/strategies.md): ties are broken by the lower position; the frequency table is
sized to the model's vocabulary (the release hard-codes LLaDA's 126464); ``debias=false`` keeps only the
positional weighting (the release always calibrates).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.samplers.certainty_prior import apply_certainty_prior
from lmeval_dllm.samplers.proposal import Proposal, Proposed
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler
from lmeval_dllm.state import DecodeState

LOG_EPS = 1e-9  # PC-Sampler's epsilon inside the log


class PCSampler(LowConfidenceSampler):
    """Commit the masked positions with the highest position-weighted, frequency-calibrated confidence.

    Args:
        proposal: token and confidence rule; the confidence must be a probability-like score (not alg=entropy).
        steps, num_transfer_tokens: per-step count, as in ``vanilla`` (default one token per step).
        threshold: commit every candidate whose *score* is >= threshold (at least the per-step count). The score
            lies in [0, clip_alpha] with ``debias`` (in [0, 1] without).
        sigma: certainty prior multiplied into the score (``certainty_prior.py``).
        lambd: lambda of the positional weight exp(-lambd * i), >= 0 (the release's ``--lambd``; 0 = no
            positional bias; the paper recommends 0.25, 0 for Sudoku, 0.5-1 for Countdown).
        debias: calibrate the confidence with the frequency table (the paper's salience score).
        clip_alpha: alpha, the clip of the calibrated confidence (> 0; the release's ``--alpha`` 10).
        frequency_table: ``llada``, ``dream`` (PC-Sampler's published tables), a JSON path or URL.
    """

    name = "pc_sampler"

    def __init__(
        self,
        proposal: Proposal,
        *,
        steps: Optional[int] = None,
        num_transfer_tokens: Optional[int] = None,
        threshold: Optional[float] = None,
        sigma: Optional[float] = None,
        lambd: float = 0.25,
        debias: bool = True,
        clip_alpha: float = 10.0,
        frequency_table: Optional[str] = None,
    ):
        # Imported here, not at module level: `python -m lmeval_dllm.samplers.frequency_table` (the table builder)
        # then runs without the package having imported it first.
        from lmeval_dllm.samplers.frequency_table import HOW_TO_GET_ONE, FrequencyTable

        if proposal.confidence == "entropy":
            raise ValueError("pc_sampler multiplies a probability-like confidence by -log f(token) and by "
                             "exp(-lambd * i); alg=entropy gives negative scores, which would invert both. Use "
                             "remasking=low_confidence (default), alg=maskgit_plus or alg=topk_margin")
        if not (math.isfinite(lambd) and lambd >= 0):
            raise ValueError(f"lambd must be a finite number >= 0 (0 = no positional weighting), got {lambd!r}")
        if not (math.isfinite(clip_alpha) and clip_alpha > 0):
            raise ValueError(f"clip_alpha must be a finite number > 0, got {clip_alpha!r}")
        top = clip_alpha if debias else 1.0
        if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= top):
            raise ValueError(f"threshold must be in [0, {top:g}] for pc_sampler (the score is "
                             f"{'the calibrated confidence, clipped at clip_alpha' if debias else 'a probability'}"
                             f", times weights <= 1), got {threshold!r}")
        if debias and frequency_table is None:
            raise ValueError(f"pc_sampler with debias=true needs a token-frequency table: {HOW_TO_GET_ONE}. "
                             "(debias=false keeps only the positional weighting.)")
        if not debias and frequency_table is not None:
            raise ValueError(f"frequency_table={frequency_table!r} is only used with debias=true; drop it or set "
                             "debias=true")
        super().__init__(proposal, steps=steps, num_transfer_tokens=num_transfer_tokens, sigma=sigma)
        self.threshold = threshold  # range checked above: the calibrated score is not a probability
        self.lambd, self.debias, self.clip_alpha = lambd, debias, clip_alpha
        self.table = FrequencyTable.load(frequency_table) if debias else None  # parsed once, on the host
        self._neg_log_freq: dict[tuple, torch.Tensor] = {}  # (device, V) -> (V,) float32, built once per device

    def neg_log_freq(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(V,) float32 -log(f + 1e-9) on ``device``: uploaded once, then reused by every step and call."""
        key = (str(device), vocab_size)
        if key not in self._neg_log_freq:
            freq = self.table.frequencies(vocab_size).to(device)
            self._neg_log_freq[key] = -torch.log(freq + LOG_EPS)
        return self._neg_log_freq[key]

    def scores(self, logits: torch.Tensor, proposed: Proposed, state: DecodeState) -> torch.Tensor:
        conf = proposed.confidence  # (B, L)
        if self.debias:
            neg_log_freq = self.neg_log_freq(logits.shape[-1], logits.device)  # (V,)
            conf = (conf * neg_log_freq[proposed.tokens]).clamp(max=self.clip_alpha)  # (B, L) salience
        offset = torch.arange(conf.shape[-1], device=conf.device, dtype=torch.float32)
        conf = conf * torch.exp(-self.lambd * offset)  # position-aware weighting, i = offset in the block
        return apply_certainty_prior(conf, state, state.block, self.sigma)
