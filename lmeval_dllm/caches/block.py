"""The exact block KV cache of block-diffusion models (SDAR, arXiv:2510.06303, JetAstra/SDAR ``generate.py``,
``block_diffusion_generate``; TraDo, LLaDA2).

A block-causal model (``ModelArgs.block_size``) attends bidirectionally inside a block and causally across
blocks, so once a block is decoded nothing right of it changes its keys and values: they are exact, and are kept.
The release prefills the prompt's full blocks once (``store_kv=True``), runs each denoising step on the current
block alone against the stored K/V (``store_kv=False``), and when the block has no masks left makes one extra pass
over it with ``store_kv=True`` to write its final K/V.

Here that extra pass is folded into the next block's first step: that step runs the finished block's rows
together with the new block's (the finished block attends only to itself and to the blocks before it, so its K/V
are exactly those of the release's extra pass), and the first step of all runs the full prompt blocks together
with the first decoded block (the prefill). Every step is one forward pass (one NFE) of ``block_size`` rows, or
``2 * block_size`` at a block's first step, ``P + block_size`` at the very first; the release makes the same
computation in one more pass per block (its NFE count is ours plus one per decoded block, plus the prefill).

A ``block_length`` that divides the model's block size decodes sub-blocks of an attention block (Fast-dLLM v2's
scheme): each step then reruns the whole attention block (its later sub-blocks' masks are attended to by the
current one), and the K/V become final when the decode loop enters the next attention block.

No approximation: ``cache=block`` gives the tokens of ``cache=none`` (the whole canvas every step, under the same
block-causal mask; ``tests/caches/test_caches_block.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.caches.base import Cache, copy_to_slots, stored_column_logits, target_rows
from lmeval_dllm.models import DiffusionLM, block_causal_families
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits

NOT_SERVED = "the block cache keeps one row of K/V per canvas column"


class BlockCache(Cache):
    """K/V of every finished block, written once; each step runs the current block (and, at its first step,
    the block before it, now final) against them. Blocks are the model's (``model.block_size``); a smaller
    ``block_length`` decodes sub-blocks of them.

    Args:
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's): three shapes per canvas
            (the first step, a block's first step, the other steps).

    Storage: K and V of shape `(n_layers, B, Hkv, T, Dh)`, one slot per canvas column, allocated when the batch
    shape changes and reused. Keys right of the current block hold stale values; the block-causal mask never
    lets a query see them.
    """

    name = "block"
    lacks = {"extra_rows": NOT_SERVED, "resize": NOT_SERVED + " of a fixed canvas"}
    needs_block_causal = True

    def __init__(self, *, cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
        self.k: Optional[torch.Tensor] = None  # (n_layers, B, Hkv, T, Dh)
        self.v: Optional[torch.Tensor] = None
        self._final = 0  # canvas columns [0, _final) hold final K/V

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        if model.block_size is None:
            raise ValueError(f"cache='block' needs a block-causal model (ModelArgs.block_size; "
                             f"{block_causal_families()}); the {model.args.family!r} model attends bidirectionally")
        a = model.args
        B, T = state.x.shape
        shape = (a.n_layers, B, a.n_kv_heads, T, a.head_dim)
        if self.k is None or tuple(self.k.shape) != shape or self.k.dtype != model.dtype \
                or self.k.device != model.device:
            self.k = self.v = None
            self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
            self.v = torch.zeros_like(self.k)
            self.graphs.reset()
        self._final = 0

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        if extra is not None:
            raise ValueError(f"cache='block' cannot run extra rows: {NOT_SERVED}")
        block, bs = state.block, model.block_size
        B, T = state.x.shape
        # Rows run: from the first column whose K/V is not final to the end of the attention block holding the
        # decode block (a decode block smaller than the model's block is a sub-block: the rest of its attention
        # block, masks included, shapes its logits and is rerun with it). A shifted model (Fast-dLLM v2 reads
        # column t from row t - 1) also reruns the row left of the block; its K/V are final, rewritten unchanged.
        q0 = max(0, min(self._final, targets.start - model.logit_shift))
        q1 = min(-(-block.stop // bs) * bs, T)
        rows = target_rows(model, targets, q0, q1)
        device = state.x.device
        write = torch.arange(q0, q1, device=device)  # (Q,) the key slot (= canvas column) of each row run
        index = torch.arange(rows.start, rows.stop, device=device)
        mask = () if state.attention_mask is None else (state.attention_mask,)

        def run(ids, pos, write, index, *mask):
            return model(ids, pos, mask[0] if mask else None, self, index, input_pos=write)

        key = ("block", B, T, q1 - q0, index.numel(), len(mask))
        logits = self.graphs.run(key, run, state.x[:, q0:q1], state.position_ids[:, q0:q1], write, index, *mask)
        # every attention block left of this one is decoded, and its K/V were just written from its final tokens
        self._final = block.start // bs * bs
        return StepLogits(logits)

    def block_start_logits(self, model: DiffusionLM, state: DecodeState, column: int) -> torch.Tensor:
        """The release's store pass (Fast-dLLM v2): the rows whose K/V are not final yet, up to ``column`` (the
        finished block, or at the first block the prompt's full blocks), write their final K/V; returns the logits
        (B, V) of ``column`` (from row ``column - 1``)."""
        logits = stored_column_logits(self, model, state, self._final, column)
        self._final = column
        return logits

    def kv_slots(self, layer_idx: int, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's K/V (B, Hkv, T, Dh); the rows run write theirs at ``input_pos`` (Q,) (those right of the
        block are masked by the model's block-causal attention)."""
        return self.k[layer_idx], self.v[layer_idx]

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, Q, Dh) of the rows run -> key slots ``input_pos`` (Q,); returns :meth:`kv_slots`."""
        return copy_to_slots(self.kv_slots(layer_idx, input_pos), input_pos, k, v)
