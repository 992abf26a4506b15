"""The types every part of the decoder shares: the decode state, what a cache returns, what a sampler decides.

This module imports nothing of the package, so the import order is linear::

    state -> models -> samplers -> caches -> generate -> decoding -> lm

Everything here is batched: fields are tensors with the batch as their first dimension, and no method loops over
rows in Python (``DecodeState.insert`` makes one host read, for the new canvas width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch


@dataclass(frozen=True)
class GenerationConfig:
    """Lengths of the generation region.

    Args:
        gen_length: number of positions generated (the canvas is prompt + ``gen_length`` masks). None for a
            sampler that chooses the length itself (``Sampler.sizes_canvas``, DAEDAL).
        block_length: semi-autoregressive block size; must divide ``gen_length``. ``gen_length`` = one block.
            With a variable length, blocks are counted from the prompt and a row's last block may be shorter.
    """

    gen_length: Optional[int]
    block_length: int

    def __post_init__(self):
        if self.block_length < 1:
            raise ValueError(f"block_length must be an integer >= 1, got {self.block_length}")
        if self.gen_length is None:
            return
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be an integer >= 1, got {self.gen_length}")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not divisible by block_length={self.block_length}; "
                f"choose a block_length that divides gen_length (e.g. 32 for 256) or block_length=gen_length"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks of a fixed-length generation."""
        return self.gen_length // self.block_length


@dataclass
class DecodeState:
    """The canvas and bookkeeping of one ``generate`` call (one batch of prompts).

    Prompts are left-padded, so every row's generation region starts at the same column ``prompt_len``. For a
    block-causal model that column starts the first decoded block, which holds each row's prompt tail before its
    masks (``answer_start``).
    """

    x: torch.Tensor  # (B, T) long: prompt (left-padded) + generation region, [MASK] where undecided
    position_ids: torch.Tensor  # (B, T) long: RoPE positions (padding does not consume positions)
    attention_mask: Optional[torch.Tensor]  # (B, T) bool key-padding mask, True = real; None if no padding
    prompt_len: int  # P: first generation column
    mask_token_id: int
    stop_token_ids: torch.Tensor  # (S,) long: ids that end an answer (EOS, end-of-turn)
    block: slice = field(default_factory=lambda: slice(0, 0))  # absolute columns of the current block
    block_index: int = 0
    # GenerationConfig.block_length. The loop's block is this wide, except for a ``multi_block`` sampler (d3LLM),
    # whose single loop block is the whole generation region and which schedules blocks of this width itself.
    block_length: int = 0
    step_in_block: int = 0  # forward passes already made in this block
    active: Optional[torch.Tensor] = None  # (B,) bool: rows that decode in this step
    decoded_at: Optional[torch.Tensor] = None  # (B, T) long: step at which a column was committed, -1 if not
    step: int = 0  # forward passes made in this call
    generator: Optional[torch.Generator] = None
    sampler_state: dict[str, Any] = field(default_factory=dict)  # per-call memory of the sampler
    # (B, T) bool: columns whose logits in this step are real predictions. The loop sets it from what the cache
    # returned with its logits (:class:`StepLogits`); the other columns hold placeholder logits and must not be
    # committed. None = all.
    fresh: Optional[torch.Tensor] = None
    # (B,) long: each row's own generation length, for samplers that grow rows (DAEDAL); None = every row spans
    # the whole canvas. Columns past a row's length hold a pad token and are hidden from attention.
    gen_lengths: Optional[torch.Tensor] = None
    # Block-causal models (``ModelArgs.block_size``): the canvas is block-aligned (generate.py,
    # :func:`~lmeval_dllm.generate.block_aligned_canvas`), so the first generation block starts with each row's
    # prompt tail. (B,) long: the generation column where each row's answer starts (its own masks); None = 0.
    answer_start: Optional[torch.Tensor] = None
    # How many blocks a strategy's total ``steps`` budget is split over (gen_length // block_length); None = the
    # canvas's blocks. A block-aligned canvas has one block more than that when a prompt ends inside a block.
    budget_blocks: Optional[int] = None

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

    def apply(self, edit: "CanvasEdit") -> None:
        """Apply a sampler's structural edit (:class:`CanvasEdit`) through :meth:`insert`."""
        self.insert(edit.at, edit.count, edit.token_ids, pad_token_id=edit.pad_token_id, max_length=edit.max_length)

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
    # (B, L) bool: positions (masked or decoded) set to ``tokens`` outright, not as a prediction: the columns of a
    # cache's skipped rows too, and ahead of ``commit`` / ``remask``. d3LLM's early stop writes EOS after a row's
    # first EOS. The loop's early finish assumes nothing before a row's first stop token is overwritten.
    overwrite: Optional[torch.Tensor] = None
    # (B, L) bool: decoded positions to revise to ``tokens`` (token to token, never back to a mask; LLaDA2.1's
    # editing). The loop applies it only where this call committed the column (``decoded_at >= 0``: never a
    # prompt column) and the logits are real (``fresh``), in active rows; a sampler that returns it declares
    # ``can_edit``.
    revise: Optional[torch.Tensor] = None
    # A structural edit of the canvas, applied by the loop after the commits (DAEDAL: grow rows, insert masks).
    edit: Optional["CanvasEdit"] = None


@dataclass(frozen=True)
class CanvasEdit:
    """Insert ``count[b]`` copies of ``token_ids[b]`` before generation column ``at[b]`` of each row (see
    :meth:`DecodeState.insert`). A sampler returns it in :attr:`StepOutput.edit`; the loop applies it after the
    step's commits, and caches see the new canvas at their next forward."""

    at: torch.Tensor  # (B,) long: generation column (0 = first generated position), at most the row's length
    count: torch.Tensor  # (B,) long: tokens inserted (0 leaves the row unchanged)
    token_ids: Union[int, torch.Tensor]  # int, or (B,) long: the token inserted in each row
    pad_token_id: int  # what fills the columns past a row's length (a stop token, never the mask)
    max_length: Optional[int] = None  # no row grows past this many generated positions


@dataclass
class StepLogits:
    """What a cache's forward returns: the logits of the asked-for columns, and which of them are real.

    ``fresh`` is None when every column was recomputed; otherwise (B, T) bool over the canvas, True where the
    logits are this step's prediction (a cache that skips columns returns placeholder zeros there).
    """

    logits: torch.Tensor  # (B, L [+ E], V): the span's columns, then the extra rows' outputs if any
    fresh: Optional[torch.Tensor] = None  # (B, T) bool

    def padded_left(self, n: int, canvas_width: int) -> "StepLogits":
        """The same logits with ``n`` columns of placeholder zeros in front (columns no row predicts: a shifted
        model's column 0), marked not fresh."""
        B, _, V = self.logits.shape
        logits = torch.cat([self.logits.new_zeros(B, n, V), self.logits], dim=1)
        fresh = self.fresh
        if fresh is None:
            fresh = torch.ones(B, canvas_width, dtype=torch.bool, device=logits.device)
        fresh = fresh.clone()
        fresh[:, :n] = False
        return StepLogits(logits, fresh)


@dataclass
class ExtraRows:
    """Rows run together with the canvas that are not part of it (WINO's shadow block).

    Canvas rows never attend to extra rows; extra rows attend to what ``sees`` allows. Their logits are the raw
    outputs of those rows (no logit shift: a Dream strategy aligns them itself).
    """

    ids: torch.Tensor  # (B, E) long
    position_ids: torch.Tensor  # (B, E) long: RoPE positions (WINO: those of the block columns they shadow)
    sees: torch.Tensor  # (B, E, T + E) bool: keys each extra row attends to, canvas keys first, then extra keys

    @property
    def count(self) -> int:
        return self.ids.shape[1]
