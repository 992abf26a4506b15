"""Certainty-prior guided decoding (``sigma``), one implementation for every score-based strategy.

d2Cache (Jiang et al. 2025, "d²Cache: Accelerating Diffusion-Based LLMs via Dual Adaptive Caching",
arXiv:2509.23094; code Kamichanw/d2Cache) multiplies each masked position's confidence by a *certainty density*:
a Gaussian-smoothed count of the decoded positions around it, so positions next to decoded context (the prompt
first) are preferred and decoding proceeds roughly left to right without semi-autoregressive blocks.

With ``u_m = 1`` where generation position m is decoded, the prompt side (m < 0) counted as decoded and the right
side (m >= G) counted as decoded iff the last position is::

    D_j = sum_{m=-G}^{2G-1} u_m exp(-(j - m)^2 / (2 sigma^2)) / Z,      Z = sum_{d=-3G}^{3G-1} exp(-d^2 / (2 sigma^2))

(docs/strategies.md; the released code computes the same sum by FFT convolution, we sum directly: a (3G, G)
kernel, one matmul per step). Z is a constant, so D is not 1 near the boundaries.

Strategies call :func:`apply_certainty_prior` on their scores; WINO and any later strategy can do the same.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.state import DecodeState


def check_sigma(sigma: Optional[float], confidence: str) -> None:
    """``sigma`` must be a finite number > 0 (or None = off), and the confidence must be >= 0."""
    if sigma is None:
        return
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (the width of the certainty prior, e.g. 10), "
                         f"or None to turn it off; got {sigma!r}")
    if confidence == "entropy":
        raise ValueError("sigma multiplies the confidence by the certainty density; with alg=entropy the confidence "
                         "is a negative entropy, so the product would favour positions far from decoded context. "
                         "Use alg=maskgit_plus / topk_margin (or remasking=low_confidence) with sigma")


def density_kernel(gen_length: int, sigma: float, device=None) -> torch.Tensor:
    """(3G, G) float32 weights: row m + G, column j = exp(-(j - m)^2 / (2 sigma^2)) / Z, for m in [-G, 2G)."""
    G = gen_length
    m = torch.arange(-G, 2 * G, device=device, dtype=torch.float64)
    j = torch.arange(G, device=device, dtype=torch.float64)
    d = torch.arange(-3 * G, 3 * G, device=device, dtype=torch.float64)
    z = torch.exp(-(d**2) / (2 * sigma**2)).sum()
    return (torch.exp(-((j[None, :] - m[:, None]) ** 2) / (2 * sigma**2)) / z).float()


def certainty_density(decoded: torch.Tensor, sigma: float, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """decoded (B, G) bool (True = position decoded) -> D (B, G) float32 in (0, 1].

    ``kernel``: :func:`density_kernel` of (G, sigma), when the caller keeps one."""
    B, G = decoded.shape
    u = decoded.float()
    extended = torch.cat([u.new_ones(B, G), u, u[:, -1:].expand(B, G)], dim=1)  # (B, 3G): prompt side, u, right
    return extended @ (kernel if kernel is not None else density_kernel(G, sigma, decoded.device))  # (B, G)


def apply_certainty_prior(
    scores: torch.Tensor, state: DecodeState, span: slice, sigma: Optional[float]
) -> torch.Tensor:
    """scores (B, len(span)) of the canvas columns ``span`` -> scores * D, with D computed over the whole
    generation region (decoded = not [MASK]). ``sigma`` None returns the scores unchanged.

    The kernel is built once per call of ``generate`` (and generation length) and kept in ``state.sampler_state``."""
    if sigma is None:
        return scores
    P, G = state.prompt_len, state.gen_length
    key = f"certainty_kernel(G={G}, sigma={sigma})"
    if key not in state.sampler_state:
        state.sampler_state[key] = density_kernel(G, sigma, state.x.device)
    density = certainty_density(state.x[:, P:] != state.mask_token_id, sigma, state.sampler_state[key])  # (B, G)
    return scores * density[:, span.start - P: span.stop - P]
