"""What every sampler shares: the decode state, the step output, the selection primitives.

A sampler answers one question per step: *given the logits of the positions I look at, which masked positions
do I commit, to which tokens (and, for revokable samplers, which do I re-mask)?* The loop in
``lmeval_dllm/generate.py`` owns everything else (blocks, EOS, caches, statistics).

Everything here is batched: no per-row Python loops and no host syncs, so a step stays on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch


@dataclass
class DecodeState:
    """The canvas and bookkeeping of one ``generate`` call (one batch of prompts).

    Prompts are left-padded, so every row's generation region starts at the same column ``prompt_len``.
    """

    x: torch.Tensor  # (B, T) long: prompt (left-padded) + generation region, [MASK] where undecided
    position_ids: torch.Tensor  # (B, T) long: RoPE positions (padding does not consume positions)
    attention_mask: Optional[torch.Tensor]  # (B, T) bool key-padding mask, True = real; None if no padding
    prompt_len: int  # P: first generation column
    mask_token_id: int
    stop_token_ids: torch.Tensor  # (S,) long: ids that end an answer (EOS, end-of-turn)
    block: slice = field(default_factory=lambda: slice(0, 0))  # absolute columns of the current block
    block_index: int = 0
    step_in_block: int = 0  # forward passes already made in this block
    active: Optional[torch.Tensor] = None  # (B,) bool: rows that decode in this step
    decoded_at: Optional[torch.Tensor] = None  # (B, T) long: step at which a column was committed, -1 if not
    step: int = 0  # forward passes made in this call
    generator: Optional[torch.Generator] = None
    sampler_state: dict[str, Any] = field(default_factory=dict)  # per-call memory of the sampler
    # (B, T) bool: columns whose logits in this step are real predictions. A cache that recomputes only some
    # positions (d2Cache) sets it; the others come back as zero logits and must not be committed. None = all.
    fresh: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def gen_length(self) -> int:
        return self.x.shape[1] - self.prompt_len

    def candidates(self, span: slice) -> torch.Tensor:
        """(B, len(span)) bool: masked positions of active rows inside ``span`` (the current block) whose
        logits this step are real predictions (see ``fresh``)."""
        cand = self.x[:, span] == self.mask_token_id
        if self.fresh is not None:
            cand = cand & self.fresh[:, span]
        return cand if self.active is None else cand & self.active[:, None]


@dataclass
class StepOutput:
    """A sampler's decision for the positions it was shown (the current block)."""

    commit: torch.Tensor  # (B, L) bool: positions to fill now
    tokens: torch.Tensor  # (B, L) long: the token for each committed position (ignored elsewhere)
    remask: Optional[torch.Tensor] = None  # (B, L) bool: decoded positions to turn back into [MASK]


class Sampler:
    """Base class. Subclasses set ``name``, take typed keyword parameters in ``__init__`` (validated there)
    and implement :meth:`step`.

    Declared abilities, read once by the loop and by compatibility checks (never ``isinstance``):

    - ``can_remask``: the sampler may turn decoded tokens back into masks (WINO).
    - ``logits_span``: "block" (logits of the current block) or "generation" (the whole generation region).
    - ``cache_needs``: what the strategy asks of a cache beyond the usual forward (``lmeval_dllm.caches.FEATURES``):
      ``"extra_rows"`` (runs rows that are not part of the canvas, e.g. WINO's shadow block, through
      ``cache.forward(..., extra=ExtraRows(...))``), ``"resize"`` (changes the canvas length while decoding, e.g.
      DAEDAL). A cache that lacks one is rejected up front with the reason.
    """

    name: ClassVar[str] = ""
    can_remask: ClassVar[bool] = False
    logits_span: ClassVar[str] = "block"
    cache_needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, proposal: "Proposal"):
        self.proposal = proposal

    def start(self, state: DecodeState) -> None:
        """Called once per ``generate`` call, before the first block. Per-call memory goes in
        ``state.sampler_state``, never on ``self`` (a sampler object is shared by many calls)."""

    def begin_block(self, state: DecodeState) -> None:
        """Called at the start of every block."""

    def forward(self, model, cache, state: DecodeState, span: slice) -> torch.Tensor:
        """Logits (B, len(span), V) for this step. The default asks the cache (the usual forward pass); a
        sampler that needs a different input (WINO's shadow block) overrides this."""
        return cache.forward(model, state, span)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        """Decide what to commit.

        Args:
            logits (`torch.Tensor` of shape `(B, L, V)`, float32): distributions of the positions in the span
                the sampler asked for (the current block by default); index i is column ``span.start + i``.
            state: the decode state (read only, except ``state.sampler_state``).
        """
        raise NotImplementedError

    def validate_lengths(self, gen_length: int, block_length: int) -> None:
        """Raise ValueError if the strategy cannot run with these lengths (called before any model work)."""


# ---------------------------------------------------------------------------------------------------------------
# Selection primitives (batched, ties broken by the lower position)


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every score in its row, 0 = highest. Equal scores rank by position (lower first).

    scores (B, L) -> rank (B, L) long. A stable descending sort keeps equal scores in position order.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, L)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k`` best candidates of each row (all of them if fewer).

    scores (B, L) float, candidates (B, L) bool, k (B,) long -> (B, L) bool.
    """
    ranked = rank_desc(scores.masked_fill(~candidates, float("-inf")))
    return candidates & (ranked < k[:, None])


def threshold_mask(scores, candidates, threshold: float, min_count: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM threshold rule: every candidate with score >= threshold, and at least the ``min_count`` best.

    Because the ``min_count`` best include every candidate above the threshold whenever there are fewer than
    ``min_count`` of them, the union below is exactly "threshold set, or top-``min_count`` if that is larger".
    """
    return (candidates & (scores >= threshold)) | top_k_mask(scores, candidates, min_count)


def factor_count(scores: torch.Tensor, candidates: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM factor rule (arXiv:2505.22618, eq. for "factor-based" parallel decoding).

    With the candidates' scores sorted descending c_(1) >= c_(2) >= ..., the n-th is accepted while
    c_(n) >= 1 - factor / (n + 1); the first is always accepted. Returns (B,) the length of the accepted
    prefix (c_(n) falls and the bound rises with n, so the accepted ranks form a prefix).
    """
    L = scores.shape[-1]
    ordered = torch.sort(scores.masked_fill(~candidates, float("-inf")), dim=-1, descending=True).values
    n = torch.arange(1, L + 1, device=scores.device, dtype=scores.dtype)
    ok = ordered >= 1.0 - factor / (n + 1.0)
    ok[:, 0] = True
    count = torch.cumprod(ok.long(), dim=-1).sum(-1)
    return torch.minimum(count, candidates.sum(-1))
