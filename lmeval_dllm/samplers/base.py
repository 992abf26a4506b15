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
    # (B,) long: each row's own generation length, for samplers that grow rows (DAEDAL); None = every row spans
    # the whole canvas. Columns past a row's length hold a pad token and are hidden from attention.
    gen_lengths: Optional[torch.Tensor] = None

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

    def insert(self, at: torch.Tensor, count: torch.Tensor, token_ids, *, pad_token_id: int,
               max_length: Optional[int] = None) -> None:
        """Insert ``count[b]`` copies of ``token_ids[b]`` before generation column ``at[b]`` of each row.

        The structural edit behind variable-length decoding (DAEDAL): appending masks at a row's end
        (``at`` = its length), or replacing one mask by several (insert before it). Everything from ``at`` on
        shifts right; a row's new length is ``min(length + count, max_length)`` (what is pushed past
        ``max_length`` is dropped). The canvas widens to the longest row; the columns past a row's length hold
        ``pad_token_id`` (a stop token, so the answer ends there; never the mask, so never a candidate) and are
        hidden from attention. Inserted columns are undecided for ``decoded_at`` (-1). RoPE positions of the
        generation region are recomputed (they continue from the prompt), so a row sees exactly what it would
        see alone.

        Args:
            at (`torch.LongTensor` of shape `(B,)`): generation column (0 = first generated position), at most
                the row's length.
            count (`torch.LongTensor` of shape `(B,)`): tokens inserted (0 leaves the row unchanged).
            token_ids (`int` or `torch.LongTensor` of shape `(B,)`): the token inserted in each row.

        One host sync (the new canvas width must be known to allocate it); nothing happens when every count is 0.
        """
        assert pad_token_id != self.mask_token_id, "the pad of short rows must not look like a mask"
        P, dev = self.prompt_len, self.x.device
        old = self.x[:, P:]  # (B, G)
        B, G = old.shape
        lengths = self.gen_lengths if self.gen_lengths is not None else torch.full((B,), G, device=dev)
        new_lengths = lengths + count
        if max_length is not None:
            new_lengths = new_lengths.clamp(max=max_length)
        most_inserted, longest = torch.stack([count.max(), new_lengths.max()]).tolist()  # the one host sync
        if most_inserted == 0:
            return
        W = max(G, longest)
        col = torch.arange(W, device=dev)[None, :]  # (1, W)
        at, count = at[:, None], count[:, None]
        inserted = (col >= at) & (col < at + count)  # (B, W)
        inside = col < new_lengths[:, None]
        src = torch.where(col < at, col, col - count).clamp(0, G - 1)  # old column shown at each new column
        token_ids = torch.as_tensor(token_ids, device=dev).expand(B)[:, None]
        gen = torch.where(inserted, token_ids, old.gather(1, src))
        gen = torch.where(inside, gen, pad_token_id)
        stamps = self.decoded_at[:, P:].gather(1, src).masked_fill(inserted | ~inside, -1)

        prompt_keys = self.attention_mask[:, :P] if self.attention_mask is not None else \
            torch.ones(B, P, dtype=torch.bool, device=dev)
        self.x = torch.cat([self.x[:, :P], gen], dim=1)
        self.decoded_at = torch.cat([self.decoded_at[:, :P], stamps], dim=1)
        self.attention_mask = torch.cat([prompt_keys, inside], dim=1)
        # positions continue from the prompt (padding consumes none), whatever the column count
        self.position_ids = torch.cat([self.position_ids[:, :P], self.position_ids[:, P:P + 1] + col], dim=1)
        self.gen_lengths = new_lengths
        self.fresh = None  # this step's logits no longer match the columns


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
    - ``sizes_canvas``: the sampler chooses each row's generation length itself (DAEDAL): the loop starts from
      its ``initial_gen_length`` instead of ``gen_length``, and :meth:`resize` may grow rows up to its
      ``max_gen_length`` (both are then attributes of the sampler).
    - ``cache_needs``: what the strategy asks of a cache beyond the usual forward (``lmeval_dllm.caches.FEATURES``):
      ``"extra_rows"`` (runs rows that are not part of the canvas, e.g. WINO's shadow block, through
      ``cache.forward(..., extra=ExtraRows(...))``), ``"resize"`` (changes the canvas length while decoding, e.g.
      DAEDAL). A cache that lacks one is rejected up front with the reason.
    """

    name: ClassVar[str] = ""
    can_remask: ClassVar[bool] = False
    logits_span: ClassVar[str] = "block"
    sizes_canvas: ClassVar[bool] = False
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

    def resize(self, state: DecodeState) -> None:
        """Called, for a ``sizes_canvas`` sampler only, after each step's decision is applied to the canvas; the
        sampler changes the canvas structure here, through :meth:`DecodeState.insert`. Default: nothing."""

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
