"""Sparse-dLLM (Song et al., "Sparse-dLLM: Accelerating Diffusion LLMs with Dynamic Cache Eviction",
arXiv:2508.02558; OpenMOSS/Sparse-dLLM ``opencompass/models/sparse_dllm``: ``CustomCache`` in
``modeling_llada.py`` / ``dream/Cache.py``, the step schedule in ``llada_generate.py`` /
``dream/generation_utils.py``).

Delayed bidirectional sparse caching: while a block is decoded, its queries attend to a *salient subset* of the
other columns' K/V (the prefix: prompt and decoded blocks; and the suffix: the masks to the right), chosen by
attention, plus their own fresh K/V. Per block:

- the first ``delay_steps`` steps run the whole canvas and store nothing (the release's one-step delay: the
  selection is made after the block's first commits, when it is more stable);
- the next step runs the whole canvas and, in every layer, scores each non-block column by
  ``importance_j = mean_heads(mean_block_rows(q) . k_j)`` (the block's mean query against each key, no softmax,
  averaged over the query heads), max-pools the scores over neighbouring columns (``kernel_size``, stride 1) and
  keeps the top ``int(keep_ratio * (T - block))`` columns' K/V;
- the other steps run only the block, attending to the kept K/V and the block's own.

Only the kept K/V are stored (allocated once per batch shape), so the memory beyond no cache is
``keep_ratio`` of one canvas's K/V, not the whole canvas's as for the dual cache.

Differences from the released code, on purpose (docs/caches.md):

- ``delay_steps`` and ``refresh_interval`` are ours: the release hard-codes a delay of one step and never
  re-selects inside a block. ``delay_steps=0, refresh_interval=1`` re-selects from a full pass at every step:
  the exact computation (whatever ``keep_ratio``).
- Ties of the pooled scores (frequent: max-pooling copies a maximum onto its neighbours) go to the leftmost
  column; the release's ``torch.topk`` breaks them in an implementation-defined order. The kept K/V are stored
  in descending score order, as ``topk`` returns them.
- Batches (the release runs one prompt at a time, unpadded): padding columns are never kept and do not
  take part in the pooling, and each row keeps ``int(keep_ratio * its own non-block columns)`` entries, so a
  row decodes in a batch as it does alone.
- Dream predicts column t from row t - 1, so the block steps also run the row left of the block (its own key
  is hidden from the block rows, which see exactly the kept K/V and the block's). The released Dream code
  runs the block alone and instead commits the block's first column at the block's first step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmeval_dllm.caches.base import Cache, copy_to_slots, target_rows
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits


def salient_columns(q_block: torch.Tensor, k: torch.Tensor, others: torch.Tensor, padding: torch.Tensor,
                    kernel_size: Optional[int], keep: int) -> torch.Tensor:
    """The ``keep`` columns among ``others`` whose keys the block's queries favour, best first.

    Args:
        q_block: (B, Hq, L, Dh) the block rows' queries (after RoPE).
        k: (B, Hkv, T, Dh) the keys of every canvas column (after RoPE); Hq is a multiple of Hkv.
        others: (N,) long, the candidate columns in canvas order (the prefix, then the suffix).
        padding: (B, T) bool, True = a padding column (never kept, no part in the pooling).
        kernel_size: max-pooling window over neighbouring candidates (odd), or None for no pooling.
        keep: how many to return (<= N).

    Returns:
        (B, keep) long canvas columns, by descending pooled score; ties go to the leftmost candidate. A row with
        fewer real candidates than ``keep`` ends with padding columns (the caller masks them).
    """
    B, Hq, _, Dh = q_block.shape
    Hkv, T = k.shape[1], k.shape[2]
    avg_q = q_block.mean(dim=-2)  # (B, Hq, Dh): the release scores keys against the block's mean query
    # grouped query heads share their key head: (B, Hkv, rep, Dh) @ (B, Hkv, Dh, T), no repeated copy of k
    scores = torch.matmul(avg_q.view(B, Hkv, Hq // Hkv, Dh), k.transpose(-2, -1)).reshape(B, Hq, T)
    importance = scores.mean(dim=1).index_select(1, others)  # (B, N)
    pad = padding.index_select(1, others)
    importance = importance.masked_fill(pad, float("-inf"))
    if kernel_size is not None and kernel_size > 1:
        # -inf padding of max_pool1d = the release's edges; padded columns re-masked (they would take a neighbour's)
        importance = F.max_pool1d(importance.unsqueeze(1), kernel_size, stride=1,
                                  padding=kernel_size // 2).squeeze(1).masked_fill(pad, float("-inf"))
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices[:, :keep]  # (B, keep)
    return others[order]


class SparseCache(Cache):
    """Sparse-dLLM: the block attends to the attention-selected ``keep_ratio`` of the other columns' K/V.

    Args:
        keep_ratio: fraction of the non-block columns (prompt, decoded blocks, masked suffix) whose K/V are kept,
            ``int(keep_ratio * count)`` per row (release default 0.5). In (0, 1].
        kernel_size: max-pooling window over the importance scores of neighbouring columns, an odd integer >= 1;
            None = no pooling (release default 3, its scripts' and configs' setting).
        delay_steps: full passes at a block's start before the one that selects and stores the K/V (release: 1,
            hard-coded). >= 0.
        refresh_interval: re-select from a full pass every ``refresh_interval`` steps after that (ours). None
            (default): once per block, as the release.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage: K and V of shape `(n_layers, B, Hkv, K + Q, Dh)`, K = the kept slots, Q = the block's rows (+1 for
    Dream), allocated when the batch shape changes and reused; a (B, K + Q) key mask; (T,) column lists.
    """

    name = "sparse"
    block_causal = (
        "it keeps an attention-selected share of the K/V chosen for full (bidirectional) attention; a "
        "block-diffusion model's finished blocks are exact in cache=block"
    )
    lacks = {
        "extra_rows": "sparse keeps K/V slots only for selected canvas columns and the block",
        "resize": "sparse selects its kept K/V by canvas column, which an insertion shifts",
    }

    def __init__(self, *, keep_ratio: float = 0.5, kernel_size: Optional[int] = 3, delay_steps: int = 1,
                 refresh_interval: Optional[int] = None, cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio}")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1 (or None for no pooling), got {kernel_size}")
        if delay_steps < 0:
            raise ValueError(f"delay_steps must be an integer >= 0, got {delay_steps}")
        if refresh_interval is not None and refresh_interval < 1:
            raise ValueError(f"refresh_interval must be an integer >= 1 (or None), got {refresh_interval}")
        self.keep_ratio, self.kernel_size = keep_ratio, kernel_size
        self.delay_steps, self.refresh_interval = delay_steps, refresh_interval
        self.k: Optional[torch.Tensor] = None  # (n_layers, B, Hkv, S, Dh): kept slots [0, K), block rows after
        self.v: Optional[torch.Tensor] = None
        self.key_mask: Optional[torch.Tensor] = None  # (B, S) bool: the slots a block row may attend to
        self._mode = "plain"  # "build": full pass that selects; "sparse": block rows over the kept K/V
        self._kept = 0  # K of the current selection
        self._block_len = 0  # L of the block it was made for
        self._built = False  # a selection exists for the current block
        self._kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # this layer's full K/V (build passes)
        self._storage_shape: Optional[tuple] = None  # (B, T, dtype, device) the buffers below were made for

    # -- storage ------------------------------------------------------------------------------------------------

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        super().setup(model, state)
        B, T = state.x.shape
        dev = state.x.device
        shape = (B, T, model.dtype, model.device)
        if shape != self._storage_shape:  # a new batch shape: storage sized for it (the old goes first)
            self.k = self.v = self.key_mask = None
            self.padding = torch.zeros(B, T, dtype=torch.bool, device=dev)  # True = padding column
            self.real = torch.zeros(B, dtype=torch.long, device=dev)  # non-padding columns per row
            self.others = torch.zeros(T, dtype=torch.long, device=dev)  # [:N]: the non-block columns
            self.block_cols = torch.zeros(T, dtype=torch.long, device=dev)  # [:L]: the block's columns
            self._storage_shape = shape
            self.graphs.reset()
        if state.attention_mask is None:
            self.padding.zero_()
            self.real.fill_(T)
        else:
            self.padding.copy_(~state.attention_mask)
            self.real.copy_(state.attention_mask.sum(dim=1))

    def _ensure(self, model: DiffusionLM, B: int, slots: int) -> None:
        """Storage with at least ``slots`` key slots (kept + block rows); reallocating drops the graphs. The
        first block needs the most (K + L grows with L), so this allocates once per batch shape."""
        if self.k is not None and self.k.shape[3] >= slots:
            return
        a = model.args
        self.k = self.v = self.key_mask = None
        self.k = torch.zeros(a.n_layers, B, a.n_kv_heads, slots, a.head_dim, dtype=model.dtype, device=model.device)
        self.v = torch.zeros_like(self.k)
        self.key_mask = torch.zeros(B, slots, dtype=torch.bool, device=model.device)
        self.graphs.reset()

    def begin_block(self, state: DecodeState) -> None:
        self._built = False

    # -- which rows run -----------------------------------------------------------------------------------------

    def step_mode(self, state: DecodeState) -> str:
        """"plain" (full pass, nothing stored), "build" (full pass that selects the kept K/V) or "sparse"."""
        n, d = state.step_in_block, self.delay_steps
        if n < d:
            return "plain"
        if not self._built or n == d or (self.refresh_interval is not None and (n - d) % self.refresh_interval == 0):
            return "build"
        return "sparse"

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        if extra is not None:
            raise ValueError(f"cache={self.name!r} cannot run extra rows: {self.lacks['extra_rows']}")
        mode = self.step_mode(state)
        if mode == "plain":
            self._mode = "plain"
            return super().forward(model, state, targets)
        B, T = state.x.shape
        dev = state.x.device
        blk, shift = state.block, model.logit_shift
        L = blk.stop - blk.start
        if mode == "build":
            N = T - L
            K = int(N * self.keep_ratio)  # the release's count (Python float product, truncated)
            self._ensure(model, B, K + L + shift)
            cols = torch.arange(T, device=dev)
            self.others[:N] = torch.cat([cols[:blk.start], cols[blk.stop:]])
            self.block_cols[:L] = cols[blk]
            # each row keeps int(keep_ratio * its own non-block columns), as alone (float64 = Python's product)
            n_keep = ((self.real - L).double() * self.keep_ratio).floor().long()  # (B,)
            slots = torch.arange(self.key_mask.shape[1], device=dev)
            self.key_mask.copy_((slots[None, :] < n_keep[:, None]) | ((slots >= K) & (slots < K + L + shift))[None])
            if shift:
                self.key_mask[:, K] = False  # the row left of the block: run for its logits, not a key
            self._kept, self._block_len, self._built, self._mode = K, L, True, "build"
            rows = target_rows(model, targets, 0, T)
            index = torch.arange(rows.start, rows.stop, device=dev)
            mask = () if state.attention_mask is None else (state.attention_mask,)

            def build(x, pos, idx, *m):
                return model(x, pos, m[0] if m else None, self, idx)

            self.needs_attention = True  # observe_attention selects (read while the forward is traced/run)
            try:
                return StepLogits(self.graphs.run(("build", B, T, L, K, index.numel(), len(mask)), build,
                                                  state.x, state.position_ids, index, *mask))
            finally:
                self.needs_attention = False
        # sparse: the block's rows (Dream: and the one left of it) over the kept K/V and their own
        self._mode = "sparse"
        K = self._kept
        q0, q1 = blk.start - shift, blk.stop
        lo, hi = max(targets.start, q0 + shift), min(targets.stop, q1 + shift)
        rows = target_rows(model, slice(lo, hi), q0, q1)
        index = torch.arange(rows.start, rows.stop, device=dev)
        write = torch.arange(K, K + q1 - q0, device=dev)

        def run(ids, pos, write, idx, *mask):
            return model(ids, pos, mask[0] if mask else None, self, idx, input_pos=write)

        # Without padding or a row left of the block, every kept slot and block row is a key: no mask, so the
        # attention can take its mask-free kernel (flash on the GPU); the key set is the same.
        mask = () if state.attention_mask is None and not shift else (self.key_mask[:, :K + q1 - q0],)
        logits = self.graphs.run(("sparse", B, T, K, q1 - q0, index.numel(), len(mask)), run, state.x[:, q0:q1],
                                 state.position_ids[:, q0:q1], write, index, *mask)
        if (lo, hi) == (targets.start, targets.stop):
            return StepLogits(logits)
        # a strategy that reads beyond the block (logits_span="generation") gets zeros there, marked not fresh
        fresh = torch.zeros(B, T, dtype=torch.bool, device=dev)
        fresh[:, lo:hi] = True
        out = logits.new_zeros(B, targets.stop - targets.start, logits.shape[-1])
        out[:, lo - targets.start:hi - targets.start] = logits
        return StepLogits(out, fresh)

    # -- layer hooks --------------------------------------------------------------------------------------------

    def update(self, layer_idx: int, input_pos: Optional[torch.Tensor], k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse steps: the block rows' k, v (B, Hkv, Q, Dh) go to slots ``input_pos`` (Q,) after the kept ones;
        returns the kept and the block's K/V (B, Hkv, K + Q, Dh). Build steps: the canvas attends to its own K/V
        (held for :meth:`observe_attention`, which selects)."""
        if self._mode == "build":
            self._kv = (k, v)
            return k, v
        return copy_to_slots(self.kv_slots(layer_idx, input_pos), input_pos, k, v)

    def kv_slots(self, layer_idx: int, input_pos: Optional[torch.Tensor]
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Sparse steps: the kept slots and the block's (B, Hkv, K + Q, Dh), the block written at ``input_pos``
        (Q,); None at build steps (``update`` holds the canvas's K/V for the selection)."""
        if self._mode == "build":
            return None
        S = self._kept + input_pos.shape[0]
        return self.k[layer_idx, :, :, :S], self.v[layer_idx, :, :, :S]

    def observe_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Build steps: q (B, Hq, T, Dh), k (B, Hkv, T, Dh) of the whole canvas -> the kept K/V of this layer."""
        k_all, v_all = self._kv
        self._kv = None
        B, Hkv, T, Dh = k_all.shape
        K, L = self._kept, self._block_len
        cols = salient_columns(q.index_select(2, self.block_cols[:L]), k_all, self.others[:T - L], self.padding,
                               self.kernel_size, K)  # (B, K)
        idx = cols[:, None, :, None].expand(B, Hkv, K, Dh)
        self.k[layer_idx, :, :, :K] = k_all.gather(2, idx)
        self.v[layer_idx, :, :, :K] = v_all.gather(2, idx)
