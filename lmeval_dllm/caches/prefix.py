"""Fast-dLLM's prefix cache (Wu et al., "Fast-dLLM", arXiv:2505.22618, §3.2 "Key-Value Cache for Block-Wise
Decoding"; NVlabs/Fast-dLLM ``llada/generate.py::generate_with_prefix_cache``).

Semi-autoregressive decoding changes only the current block, and the K/V of the prompt and of finished blocks
barely move while it is being decoded. So: at the first step of each block run the whole canvas and keep every
layer's K/V; at the other steps run only the block and everything to its right (the still-masked suffix),
attending to the cached prefix K/V and to their own fresh K/V.

Differences from the released code, on purpose:

- ``refresh_interval`` (ours; off by default, as in the paper): also rerun the whole canvas every
  ``refresh_interval`` steps inside a block. ``refresh_interval=1`` is the exact computation.
- Dream predicts column t from row t - 1, so the rows run start one column left of the block (the released Dream
  code reads the block's first column from its own row instead).
- Batches: every row runs the same columns (blocks are aligned across rows by left padding); padded keys are
  masked.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.caches.base import Cache, copy_to_slots, extended_mask, target_rows
from lmeval_dllm.caches.graphs import StepGraphs
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits


class PrefixCache(Cache):
    """K/V of every position from the block's first step; later steps rerun the block and the suffix.

    Args:
        refresh_interval: rerun the whole canvas every ``refresh_interval`` steps inside a block (the block's
            first step always does). None (default): only at block starts, as Fast-dLLM.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage: K and V of shape `(n_layers, B, Hkv, T [+ E], Dh)`, allocated when the batch shape changes and
    reused (E extra slots appear when a strategy runs :class:`ExtraRows`).
    """

    name = "prefix"
    keeps_cached_keys_on_resize = True  # the prefix lies left of every insertion point (DAEDAL inserts in-block)
    block_dependent_shapes = True  # the rows run shrink block by block: their graphs are dropped at block starts

    def __init__(self, *, refresh_interval: Optional[int] = None, cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
        if refresh_interval is not None and refresh_interval < 1:
            raise ValueError(f"refresh_interval must be an integer >= 1 (or None), got {refresh_interval}")
        self.refresh_interval = refresh_interval
        self.k: Optional[torch.Tensor] = None  # (n_layers, B, Hkv, S, Dh), S = T + extra slots
        self.v: Optional[torch.Tensor] = None
        # graphs whose shapes change with the block (dropped at block starts)
        self.block_graphs = StepGraphs(enabled=cuda_graphs)
        self._length = 0  # canvas length the stored K/V belong to
        self._stale = True  # nothing usable stored: the next step runs the whole canvas
        # Fast-dLLM v2's block cache rule (cache=dual on that family, ``DualCache.setup``): while a row's block
        # starts with a mask it runs a full step (``full_span``), the others their block
        self.masked_start_refresh = False
        self._keep: Optional[torch.Tensor] = None  # (B, Q) bool during a mixed step: the K/V written fresh

    # -- storage ------------------------------------------------------------------------------------------------

    def _allocate(self, model: DiffusionLM, B: int, slots: int, keep: int = 0) -> None:
        """(Re)allocate K/V with ``slots`` key slots, keeping the first ``keep`` slots of the old storage."""
        a = model.args
        shape = (a.n_layers, B, a.n_kv_heads, slots, a.head_dim)
        if self.k is not None and tuple(self.k.shape) == shape and self.k.dtype == model.dtype \
                and self.k.device == model.device:
            return
        old_k, old_v = self.k, self.v
        self.k = self.v = None  # let the old storage go before the new is taken when nothing is kept
        if not keep:
            old_k = old_v = None
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros_like(self.k)
        if keep:
            self.k[..., :keep, :] = old_k[..., :keep, :]
            self.v[..., :keep, :] = old_v[..., :keep, :]
        self.graphs.reset()
        self.block_graphs.reset()

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        B, T = state.x.shape
        self._allocate(model, B, T)
        self._length, self._stale = T, True

    def begin_block(self, state: DecodeState) -> None:
        self.block_graphs.reset()

    # -- which rows run -----------------------------------------------------------------------------------------

    def query_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        """Canvas columns ``[q0, q1)`` run at a cached step: the block and the suffix (Dream: from one column
        left of the block, the row that predicts the block's first column)."""
        return max(0, state.block.start - model.logit_shift), state.x.shape[1]

    def full_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        """Canvas columns ``[q0, q1)`` a full step runs: all of them."""
        return 0, state.x.shape[1]

    def full_step(self, state: DecodeState) -> bool:
        n = state.step_in_block
        return self._stale or n == 0 or (self.refresh_interval is not None and n % self.refresh_interval == 0)

    def _resize(self, model: DiffusionLM, state: DecodeState, extra_slots: int) -> None:
        B, T = state.x.shape
        if T != self._length:  # the canvas grew or shrank (DAEDAL): keep the prefix, or start over
            keep = state.block.start if self.keeps_cached_keys_on_resize and not self._stale else 0
            self._allocate(model, B, T + extra_slots, keep=keep)
            self._stale = self._stale or not keep
            self._length = T
        elif self.k.shape[3] != T + extra_slots:  # extra rows appeared (or changed count): grow, keep all
            self._allocate(model, B, T + extra_slots, keep=T)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        B, T = state.x.shape
        E = 0 if extra is None else extra.count
        self._resize(model, state, E)
        full, keep = self.full_step(state), None
        if not full and self.masked_start_refresh:
            need = state.x[:, state.block.start] == state.mask_token_id  # (B,) rows that refresh this step
            some, every = torch.stack([need.any(), need.all()]).tolist()  # one host read
            if some:
                full = True
                if not every:  # the other rows keep their stored K/V outside their block, as at a cached step
                    keep = need
        q0, q1 = self.full_span(model, state) if full else self.query_span(model, state)
        if keep is not None:  # (B, Q) over the rows run
            c0, c1 = self.query_span(model, state)
            col = torch.arange(q0, q1, device=state.x.device)
            keep = keep[:, None] | ((col >= c0) & (col < c1))[None, :]
        shift = model.logit_shift
        # Columns these rows predict; a strategy looking beyond them (logits_span="generation") gets zeros there.
        lo, hi = max(targets.start, q0 + shift), min(targets.stop, q1 + shift)
        fresh = None
        if (lo, hi) != (targets.start, targets.stop):
            fresh = torch.zeros(B, T, dtype=torch.bool, device=state.x.device)
            fresh[:, lo:hi] = True
        rows = target_rows(model, slice(lo, hi), q0, q1)
        device = state.x.device
        cols = torch.arange(q0, q1, device=device)
        index = torch.arange(rows.start, rows.stop, device=device)
        if extra is None:
            ids, pos, write = state.x[:, q0:q1], state.position_ids[:, q0:q1], cols
            mask = () if state.attention_mask is None else (state.attention_mask,)
        else:
            ids = torch.cat([state.x[:, q0:q1], extra.ids], dim=1)
            pos = torch.cat([state.position_ids[:, q0:q1], extra.position_ids], dim=1)
            write = torch.cat([cols, T + torch.arange(E, device=device)])
            index = torch.cat([index, (q1 - q0) + torch.arange(E, device=device)])
            mask = (extended_mask(state, extra, cols),)

        def run(ids, pos, write, index, *mask):  # write (Q [+ E],): the key slot of each row run
            return model(ids, pos, mask[0] if mask else None, self, index, input_pos=write)

        def run_mixed(ids, pos, write, index, keep, *mask):
            self._keep = keep
            try:
                return run(ids, pos, write, index, *mask)
            finally:
                self._keep = None

        key = ("full" if full else "cached", B, T, q1 - q0, E, index.numel(), len(mask))
        graphs = self.graphs if full or not self.block_dependent_shapes else self.block_graphs
        if keep is None:
            logits = graphs.run(key, run, ids, pos, write, index, *mask)
        else:
            logits = graphs.run(("mixed", *key[1:]), run_mixed, ids, pos, write, index, keep, *mask)
        if full:
            self._stale = False
        if fresh is None:
            return StepLogits(logits)
        out = logits.new_zeros(B, targets.stop - targets.start + E, logits.shape[-1])
        out[:, lo - targets.start:hi - targets.start] = logits[:, :hi - lo]
        if E:
            out[:, -E:] = logits[:, hi - lo:]
        return StepLogits(out, fresh)

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, Q, Dh) of the rows run -> stored at key slots ``input_pos`` (Q,); returns every stored
        key and value (B, Hkv, T [+ E], Dh): the storage holds exactly the canvas and this step's extra rows.
        A mixed step (``_keep``) writes fresh K/V only where ``_keep`` is True, keeping the stored ones elsewhere."""
        if self._keep is not None:
            keep = self._keep[:, None, :, None]  # (B, 1, Q, 1)
            k = torch.where(keep, k, self.k[layer_idx].index_select(2, input_pos))
            v = torch.where(keep, v, self.v[layer_idx].index_select(2, input_pos))
        return copy_to_slots((self.k[layer_idx], self.v[layer_idx]), input_pos, k, v)

    def kv_slots(self, layer_idx: int, input_pos: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Every stored key and value (B, Hkv, T [+ E], Dh), written at ``input_pos``; None at a mixed step
        (``update`` keeps some of the stored K/V)."""
        return None if self._keep is not None else (self.k[layer_idx], self.v[layer_idx])
