"""What every sampler shares: the base class and the batched selection primitives (the decode state and the step
output live in ``lmeval_dllm.state``).

A sampler answers one question per step: *given the logits of the positions I look at, which masked positions
do I commit, to which tokens (and, for revokable samplers, which do I re-mask)?* The loop in
``lmeval_dllm/generate.py`` owns everything else (blocks, EOS, caches, statistics).

Everything here is batched: no per-row Python loops and no host syncs, so a step stays on the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from lmeval_dllm.state import DecodeState, StepLogits, StepOutput

if TYPE_CHECKING:
    from lmeval_dllm.samplers.proposal import Proposal


class Sampler:
    """Base class. Subclasses set ``name``, take typed keyword parameters in ``__init__`` (validated there)
    and implement :meth:`step`.

    Declared abilities, read once by the loop and by compatibility checks (never ``isinstance``):

    - ``can_remask``: the sampler may turn decoded tokens back into masks (WINO).
    - ``can_edit``: the sampler may overwrite decoded tokens of the current block with other tokens
      (``StepOutput.revise``, LLaDA2.1's token editing); like ``can_remask``, a row's answer is then final only
      at the end of a block, so the loop checks for a finished row there.
    - ``logits_span``: "block" (logits of the current block) or "generation" (the whole generation region).
    - ``sizes_canvas``: the sampler chooses each row's generation length itself (DAEDAL): the loop starts from
      its ``initial_gen_length`` instead of ``gen_length``, and a step may return a :class:`CanvasEdit` in
      ``StepOutput.edit`` that grows rows up to its ``max_gen_length`` (both are then attributes of the sampler);
      the loop applies it after the step's commits.
    - ``multi_block``: the sampler keeps several blocks in flight (d3LLM): the loop runs one block spanning the
      whole generation region (caches see it as the block) and the sampler schedules its own blocks of
      ``state.block_length`` columns inside it; use it with ``logits_span = "generation"``.
    - ``cache_needs``: what the strategy asks of a cache beyond the usual forward (``lmeval_dllm.caches.FEATURES``):
      ``"extra_rows"`` (runs rows that are not part of the canvas, e.g. WINO's shadow block, through
      ``cache.forward(..., extra=ExtraRows(...))``), ``"resize"`` (changes the canvas length while decoding, e.g.
      DAEDAL). A cache that lacks one is rejected up front with the reason.
    """

    name: ClassVar[str] = ""
    can_remask: ClassVar[bool] = False
    can_edit: ClassVar[bool] = False
    logits_span: ClassVar[str] = "block"
    sizes_canvas: ClassVar[bool] = False
    multi_block: ClassVar[bool] = False
    cache_needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, proposal: "Proposal"):
        self.proposal = proposal

    def start(self, state: DecodeState) -> None:
        """Called once per ``generate`` call, before the first block. Per-call memory goes in
        ``state.sampler_state``, never on ``self`` (a sampler object is shared by many calls)."""

    def begin_block(self, state: DecodeState) -> None:
        """Called at the start of every block."""

    def forward(self, model, cache, state: DecodeState, span: slice) -> StepLogits:
        """Logits (B, len(span), V) for this step, with the columns that are real predictions. The default asks
        the cache (the usual forward pass); a sampler that needs a different input (WINO's shadow block)
        overrides this."""
        return cache.forward(model, state, span)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        """Decide what to commit.

        Args:
            logits (`torch.Tensor` of shape `(B, L, V)`): distributions of the positions in the span the sampler
                asked for (the current block by default); index i is column ``span.start + i``. float32 for
                ``logits_span="block"``; in the model's dtype for ``"generation"`` (a sampler converts the rows
                it reads: a (B, G, V) float copy of the whole region every step is most of a small model's step).
            state: the decode state (read only, except ``state.sampler_state``).
        """
        raise NotImplementedError

    def block_continues(self, state: DecodeState, has_mask: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which rows make another pass over the current block. Called once before every pass of a
        block (``state.step_in_block`` passes made so far), with ``has_mask`` (B,) bool = the row's block still
        holds a mask; rows already finished are excluded by the loop. The default is today's rule, "a block is
        done when it has no mask"; an editing sampler (LLaDA2.1) keeps a mask-free block for further passes."""
        return has_mask

    def step_budget(self, block_length: int) -> int:
        """Most forward passes one block may take before the loop stops with an error (a guard against a
        sampler or cache bug that never decodes the block). ``block_length`` is the loop block's width: the whole
        generation region for a ``multi_block`` sampler. A sampler that commits at least one position per
        step needs ``block_length``; the default leaves room for re-masking and fallbacks."""
        return 4 * block_length + 16

    def validate_lengths(self, gen_length: Optional[int], block_length: int) -> None:
        """Raise ValueError if the strategy cannot run with these lengths (called before any model work).
        ``gen_length`` is None for a ``sizes_canvas`` sampler."""


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
