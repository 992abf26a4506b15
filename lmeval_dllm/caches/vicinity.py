"""dInfer's vicinity refresh (Ma et al., "dInfer", arXiv:2510.08666, §"KV-cache: vicinity refresh";
inclusionAI/dInfer ``python/dinfer/decoding/generate_uniform.py::VicinityCacheIteration``).

A dual cache whose cached steps recompute a window wider than the block: the ``prefix_look`` columns left of it
and the ``after_look`` columns right of it run with the block, so the K/V of the block's neighbourhood, the part of
the context that moves most while the block is decoded, stay current; everything else is read from the K/V of the
last full pass. The first ``warmup_steps`` forward passes of a call run the whole canvas without the cache (the
first steps change the canvas most). Then the whole canvas runs, and its K/V are stored, at the first step of
every block (and at the first step after the warm-up); the other steps run only the window.

With ``prefix_look = after_look = warmup_steps = 0`` (the release's defaults) this is Fast-dLLM's dual cache; the
release's benchmarks use 16 / 16 / 4 (docs/caches.md).

Deviations from the released code (docs/caches.md):

- Batches: the warm-up counts each row's own forward passes (the release counts the batch's), so a row decodes
  in a batch as it does alone. A step where some rows are in their warm-up and others are not runs the whole
  canvas; the rows past the warm-up take fresh K/V only inside the window and the stored K/V elsewhere, which is
  what running the window alone computes.
- The release refreshes twice when the warm-up ends inside a block other than the first (its block-change test
  sees no previous block after the first fill); here the first fill is that block's refresh.
- ``refresh_interval`` (ours, as for prefix / dual): also run the whole canvas every ``refresh_interval`` steps
  inside a block; 1 = the exact computation. The release's ``cache_update_freq`` counts steps over the whole call
  and only applies after the first block.
- A refresh step is one forward pass: the release also runs the window right after it in the same iteration
  (two passes), which decodes with the next step's inputs either way; the tokens are the same and the count of
  forward passes is lower by one per refresh when the refresh step finishes the block.
- Dream (not in the release): the window starts at least one column left of the block (the row that predicts the
  block's first column).
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.caches.prefix import PrefixCache
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits


class VicinityCache(PrefixCache):
    """Dual cache whose cached steps rerun the block and ``prefix_look`` / ``after_look`` columns around it.

    Args:
        prefix_look: columns left of the block rerun at every cached step (release default 0).
        after_look: columns right of the block rerun at every cached step (release default 0).
        warmup_steps: each row's first ``warmup_steps`` forward passes run the whole canvas without the cache
            (release default 0).
        refresh_interval: also run the whole canvas every ``refresh_interval`` steps inside a block (the block's
            first step always does). None (default): only at block starts, as the release.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage: K and V of shape `(n_layers, B, Hkv, T [+ E], Dh)` (as the dual cache) and three (B,) counters.
    With ``warmup_steps`` > 0 a step reads one small tensor (which rows are still warming up) from the device.
    """

    name = "vicinity"
    block_causal = (
        "it refreshes a window right of the block that a block-causal model never attends to"
    )
    lacks = {"resize": "vicinity counts each row's warm-up and refreshes by canvas position, which an insertion "
                       "shifts"}
    block_dependent_shapes = False  # the window has one length except where the canvas clips it

    def __init__(self, *, prefix_look: int = 0, after_look: int = 0, warmup_steps: int = 0,
                 refresh_interval: Optional[int] = None, cuda_graphs: bool = True):
        super().__init__(refresh_interval=refresh_interval, cuda_graphs=cuda_graphs)
        for name, value in (("prefix_look", prefix_look), ("after_look", after_look), ("warmup_steps", warmup_steps)):
            if value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value}")
        self.prefix_look, self.after_look, self.warmup_steps = prefix_look, after_look, warmup_steps
        self.select: Optional[torch.Tensor] = None  # (B, 1, S, 1) bool: slots whose fresh K/V a full pass keeps
        self._full = False  # this step runs the whole canvas (update keeps the selected slots' fresh K/V)

    def _allocate(self, model: DiffusionLM, B: int, slots: int, keep: int = 0) -> None:
        super()._allocate(model, B, slots, keep)
        if self.select is None or tuple(self.select.shape) != (B, 1, slots, 1) or self.select.device != model.device:
            self.select = torch.ones(B, 1, slots, 1, dtype=torch.bool, device=model.device)

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        super().setup(model, state)
        B, dev = state.batch_size, state.x.device
        self.passes = torch.zeros(B, dtype=torch.long, device=dev)  # forward passes each row was active in
        self.filled = torch.zeros(B, dtype=torch.bool, device=dev)  # K/V stored by a pass after the warm-up
        self.filled_block = torch.full((B,), -1, dtype=torch.long, device=dev)  # block of that pass

    def query_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        """The window: ``prefix_look`` columns left of the block (Dream: at least one), the block, ``after_look``
        columns right of it, clipped to the canvas."""
        q0 = state.block.start - max(self.prefix_look, model.logit_shift)
        return max(q0, 0), min(state.block.stop + self.after_look, state.x.shape[1])

    def full_step(self, state: DecodeState) -> bool:
        return self._full

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        B, T = state.x.shape
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        warming = self.passes < self.warmup_steps
        # rows that need the whole canvas: warming up, or no K/V of theirs stored for this block yet
        need = active & (warming | ~self.filled | (self.filled_block != state.block_index))
        E = 0 if extra is None else extra.count
        self._resize(model, state, E)  # (re)allocates storage and the selection before it is filled
        self._full, mixed = True, False
        if not super().full_step(state):  # the block's first step, a periodic refresh, or nothing stored: all full
            if self.warmup_steps == 0:  # every row refreshed at the block's first step
                self._full = False
            else:
                any_need, all_need = torch.stack([need.any(), (need | ~active).all()]).tolist()  # one host read
                self._full, mixed = bool(any_need), bool(any_need and not all_need)
        q0, q1 = self.query_span(model, state)
        if self._full:
            window = torch.zeros(T + E, dtype=torch.bool, device=state.x.device)
            window[q0:q1] = True
            window[T:] = True
            keep = (need[:, None] | window[None, :]) if mixed else torch.ones_like(self.select[:, 0, :, 0])
            self.select.copy_(keep[:, None, :, None])
        out = super().forward(model, state, targets, extra)
        if mixed:  # rows past their warm-up see, as alone, only the window's fresh predictions
            shift = model.logit_shift
            if targets.start < q0 + shift or targets.stop > q1 + shift:  # only a "generation"-span strategy
                cols = torch.arange(T, device=state.x.device)
                fresh = need[:, None] | ((cols >= q0 + shift) & (cols < q1 + shift))[None, :]  # (B, T)
                logits = out.logits.clone()
                span = targets.stop - targets.start
                logits[:, :span] *= fresh[:, targets, None]
                out = StepLogits(logits, fresh)
        ran_full = need if mixed else (active if self._full else torch.zeros_like(active))
        stored = ran_full & ~warming
        self.filled |= stored
        self.filled_block = torch.where(stored, state.block_index, self.filled_block)
        self.passes += active.long()
        return out

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached steps: as the dual cache (store the window's K/V at ``input_pos``, attend to all). Full steps
        (``input_pos`` = every slot): keep the fresh K/V where ``select`` says, the stored K/V elsewhere."""
        if not self._full:
            return super().update(layer_idx, input_pos, k, v)
        k = torch.where(self.select, k, self.k[layer_idx])
        v = torch.where(self.select, v, self.v[layer_idx])
        self.k[layer_idx].copy_(k)
        self.v[layer_idx].copy_(v)
        return k, v

    def kv_slots(self, layer_idx: int, input_pos: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """As the dual cache at a cached step; None at a full one (``update`` selects between fresh and stored)."""
        return None if self._full else super().kv_slots(layer_idx, input_pos)
