"""From logits to a proposed token and a confidence for every position (shared by all strategies).

Two families of conventions exist and both are supported, under the names researchers know:

- LLaDA (ML-GSAI/LLaDA ``generate.py``, ``remasking=low_confidence|random``): the token is drawn by Gumbel-max
  in float64 at ``temperature`` (arXiv:2409.02908 shows low-precision Gumbel noise hurts MDMs), and the
  confidence is the probability of that token under the *clean* softmax (no temperature, no filtering).
  ``remasking=random`` gives every position a uniform random priority.
- Dream (DreamLM/Dream ``generation_utils.py``, ``alg=maskgit_plus|topk_margin|entropy``): logits are divided by
  the temperature, filtered by ``top_p``/``top_k``, and the confidence is read from that filtered
  distribution: its probability of the token, the top-1 minus top-2 margin, or the negative entropy.

At temperature 0 without filters ``low_confidence`` and ``maskgit_plus`` coincide. Confidences are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

REMASKING = ("low_confidence", "random")
ALGS = ("maskgit_plus", "topk_margin", "entropy")


class Proposed(NamedTuple):
    tokens: torch.Tensor  # (B, L) long
    confidence: torch.Tensor  # (B, L) float32 (or the dtype asked for)
    probs: Optional[torch.Tensor]  # (B, L, V) filtered distribution, when asked for (same dtype)


@dataclass(frozen=True)
class Proposal:
    """How tokens and confidences are read from the logits.

    Args:
        temperature: 0 = greedy (argmax). > 0: sample (Gumbel-max in float64).
        top_p: nucleus filter in (0, 1]; the token that crosses ``top_p`` is kept (Dream's rule).
        top_k: keep the ``top_k`` largest logits (ties at the boundary kept).
        confidence: one of ``low_confidence``, ``random`` (LLaDA ``remasking``) or ``maskgit_plus``,
            ``topk_margin``, ``entropy`` (Dream ``alg``).
        logits_eos_inf: LLaDA's ``logits_eos_inf``: the EOS logit is -inf, so EOS is never proposed.
        confidence_eos_eot_inf: LLaDA's ``confidence_eos_eot_inf``: EOS and end-of-turn are removed from the
            distribution the confidence is read from, so a proposed EOS/EoT has confidence 0 and is committed
            last (LLaDA paper, Appendix B.4). Applied at every temperature (the released code, through a chained
            assignment, misses EOS when temperature > 0; see docs/strategies.md).
        eos_token_id, eot_token_id: bound by the loader from the tokenizer / config.
    """

    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    confidence: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None

    @classmethod
    def from_params(
        cls,
        *,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        remasking: Optional[str] = None,
        alg: Optional[str] = None,
        logits_eos_inf: bool = False,
        confidence_eos_eot_inf: bool = False,
    ) -> "Proposal":
        """Validate the user-facing parameters (names as in LLaDA's and Dream's code)."""
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_p is not None and not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
        if remasking is not None and alg is not None:
            raise ValueError(
                f"remasking={remasking!r} and alg={alg!r} both choose the confidence; give one "
                f"(remasking: {', '.join(REMASKING)}; alg: {', '.join(ALGS)})"
            )
        if remasking is not None and remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {remasking!r}")
        if alg is not None and alg not in ALGS:
            raise ValueError(f"alg must be one of {', '.join(ALGS)}, got {alg!r}")
        return cls(
            temperature=float(temperature), top_p=top_p, top_k=top_k,
            confidence=remasking or alg or "low_confidence",
            logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
        )

    def bind(self, eos_token_id: Optional[int], eot_token_id: Optional[int]) -> "Proposal":
        if (self.logits_eos_inf or self.confidence_eos_eot_inf) and eos_token_id is None:
            raise ValueError("logits_eos_inf / confidence_eos_eot_inf need an EOS token id, and the tokenizer has none")
        return replace(self, eos_token_id=eos_token_id, eot_token_id=eot_token_id)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _suppressed(self) -> list[int]:
        return [i for i in (self.eos_token_id, self.eot_token_id) if i is not None]

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, L, V) -> tempered, top-p/top-k filtered logits (dropped entries are -inf)."""
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            mass_before = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1) - torch.softmax(sorted_logits, -1)
            drop_sorted = mass_before > self.top_p  # keeps the token that crosses top_p; rank 0 always kept
            drop_sorted[..., 0] = False
            drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        if self.top_k is not None:
            k = min(self.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits

    def __call__(
        self, logits: torch.Tensor, generator: Optional[torch.Generator] = None, need_probs: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Proposed:
        """logits (B, L, V) float32 -> tokens (B, L), confidence (B, L) [, probs (B, L, V)].

        ``dtype``: precision of the confidence and probabilities (float32; float64 where a paper's release computes
        them so, e.g. KLASS: in float32 every probability above 1 - 6e-8 rounds to 1.0 and ties)."""
        logits = logits.to(dtype)
        if self.logits_eos_inf:
            logits = logits.clone()
            logits[..., self.eos_token_id] = float("-inf")
        filtered = self.filtered(logits)
        if self.greedy:
            tokens = filtered.argmax(-1)
        else:
            # Gumbel-max in float64: argmax(l/T + g) == argmax(exp(l) / (-log u)^T), LLaDA's add_gumbel_noise.
            u = torch.rand(filtered.shape, dtype=torch.float64, device=filtered.device, generator=generator)
            tokens = (filtered.double() - torch.log(-torch.log(u))).argmax(-1)

        conf_src = logits if self.confidence == "low_confidence" else filtered
        if self.confidence_eos_eot_inf:
            conf_src = conf_src.clone()
            conf_src[..., self._suppressed()] = float("-inf")
        probs = None
        if self.confidence == "low_confidence":
            # softmax then gather, as LLaDA's generate.py (and PC-Sampler's, KLASS's): exp(l - logsumexp) rounds
            # differently near p = 1, which turns some of the releases' distinct confidences into ties.
            confidence = torch.softmax(conf_src, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        elif self.confidence == "random":
            confidence = torch.rand(tokens.shape, device=tokens.device, generator=generator)
        else:
            p = torch.softmax(conf_src, dim=-1)
            if self.confidence == "maskgit_plus":
                confidence = p.gather(-1, tokens[..., None]).squeeze(-1)
            elif self.confidence == "topk_margin":
                top2 = torch.topk(p, 2, dim=-1).values
                confidence = top2[..., 0] - top2[..., 1]
            else:  # entropy: negative entropy, higher = more certain
                confidence = (p * torch.log(p + 1e-10)).sum(-1)
            if need_probs and not self.confidence_eos_eot_inf:
                probs = p
        if need_probs and probs is None:
            probs = torch.softmax(filtered, dim=-1)
        return Proposed(tokens, confidence.to(dtype), probs)
