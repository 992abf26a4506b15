"""Block-causal attention on flash attention's variable-length kernel (GPU): no mask, and only the visible keys read.

A block-diffusion step (SDAR, arXiv:2510.06303; Fast-dLLM v2, arXiv:2509.26328; LLaDA2) runs a few rows, one
block of masks and perhaps the row left of it, against every key slot of the canvas, most of which those rows may
not see. SDPA takes that pattern only as an explicit mask, which rules out its flash kernel: cuDNN's masked call is
34.4 us for Fast-dLLM v2's 33 rows over 513 slots, flash over only the visible keys 9.8 us
(``benchmarks/bench_attention.py``, H200), 28 times a step.

The rows of one canvas block all see the same keys: one contiguous range of slots, from the row's first real key
(its left padding is whole blocks, ``generate.block_aligned_canvas``) to the end of the block (or of the row's
canvas, or of the slots). So the rows are cut into runs of one block each, and each run is one "sequence" of flash
attention's variable-length entry point: its queries are the run's rows, its keys start at the run's first key
(``cu_seqlens_k``, an offset into the stored K/V, which are read in place) and it reads ``seqused_k`` of them. Those
counts are tensors computed on the GPU from the rows' columns, so one CUDA graph serves every block, and a step
makes no host read.

:func:`block_runs` is plain tensor code (it runs and is tested on the CPU); :func:`block_causal_flash` needs a
CUDA GPU with flash attention (sm80 or newer, float16 / bfloat16, head dim a multiple of 8 up to 256):
:func:`flash_supported` says when it may be used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class BlockRuns:
    """The runs of one forward's rows, as flash attention's variable-length call takes them (N = B * G runs, G
    per row of the batch, the unused ones empty).

    Attributes:
        cu_q: (N + 1,) int32, run n's queries are rows ``[cu_q[n], cu_q[n + 1])`` of the (B * Q) packed rows.
        key_start: (B, G) long, the first key slot run (b, g) attends to.
        key_count: (N,) int32, how many consecutive slots from there it attends to (>= 1).
        max_q: the most rows of one run (an upper bound: a grid size).
    """
    cu_q: torch.Tensor
    key_start: torch.Tensor
    key_count: torch.Tensor
    max_q: int
    cu_k: dict = field(default_factory=dict)  # (slots per row, tokens) -> (N + 1,) int32, built once per forward

    def key_offsets(self, per_row: int, tokens: int) -> torch.Tensor:
        """(N + 1,) int32: run n's first key as a token of the flattened storage (row b's slot t is token
        ``b * per_row + t``), then ``tokens``; computed once per forward, shared by the layers."""
        hit = self.cu_k.get((per_row, tokens))
        if hit is None:
            B = self.key_start.shape[0]
            start = (torch.arange(B, device=self.key_start.device)[:, None] * per_row + self.key_start).flatten()
            hit = self.cu_k[(per_row, tokens)] = torch.cat([start, start.new_full((1,), tokens)]).to(torch.int32)
        return hit


def block_runs(cols: torch.Tensor, batch: int, keys: int, block_size: int,
               key_mask: Optional[torch.Tensor]) -> BlockRuns:
    """Cut the rows run into runs of one canvas block each, with the key range each run attends to.

    cols (1|B, Q) long: the rows' canvas columns, *consecutive* in each row (every cache of a block-causal model
    runs a span of columns; the model's default is 0..Q-1); keys: the key slots (slot j = canvas column j);
    key_mask (B, keys) bool or None: the real keys of each row, one run of True per row (the block-aligned canvas's
    window; None = all real).

    A run in block ``k`` of row b attends to the real keys of columns ``< (k + 1) * block_size``: that is
    :func:`~lmeval_dllm.models.transformer.block_causal` and-ed with ``key_mask``, for every real query. A query
    outside its row's window (padding, or the fill right of a shorter row) whose range is empty gets the row's
    first real key instead: its output is finite and no real query reads it (the masked path gives such a query
    its own column).
    """
    B, Q = batch, cols.shape[1]
    cols = cols.expand(B, Q)
    blk = cols // block_size  # (B, Q)
    # run index of each row: the blocks met so far (Q consecutive columns span at most (Q - 1) // bs + 2 blocks)
    G = min(Q, (Q - 1) // block_size + 2)
    run = torch.cat([torch.zeros_like(blk[:, :1]), (blk[:, 1:] != blk[:, :-1]).long()], dim=1).cumsum(1)
    onehot = run[:, :, None] == torch.arange(G, device=cols.device)  # (B, Q, G)
    lengths = onehot.sum(1)  # (B, G)
    ends = ((blk + 1) * block_size).clamp(max=keys)  # (B, Q): the end of each row's visible slots
    end = torch.where(onehot, ends[:, :, None], 0).amax(1)  # (B, G)
    if key_mask is None:
        lo = torch.zeros(B, 1, dtype=torch.long, device=cols.device)
        hi = torch.full((B, 1), keys, dtype=torch.long, device=cols.device)
    else:
        real = key_mask.long()
        lo = real.argmax(1, keepdim=True)  # (B, 1) the first real key
        hi = lo + real.sum(1, keepdim=True)
    key_count = (torch.minimum(end, hi) - lo).clamp(min=1)
    cu_q = F.pad(lengths.flatten().cumsum(0), (1, 0)).to(torch.int32)
    # max_q >= 2: at 1, flash's variable-length call takes a decoding path that assumes one query per sequence
    return BlockRuns(cu_q, lo.expand(B, G), key_count.flatten().to(torch.int32), max(2, min(Q, block_size)))


def flash_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`block_causal_flash` runs on these tensors: CUDA, float16 / bfloat16, head dim a multiple of
    8 up to 256, on an sm80+ GPU with PyTorch's flash attention."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype):
        return False
    D = q.shape[-1]
    return D % 8 == 0 and D <= 256 and _flash_available(q.device)


_AVAILABLE: dict[torch.device, bool] = {}


def _flash_available(device: torch.device) -> bool:
    if device not in _AVAILABLE:
        _AVAILABLE[device] = bool(
            hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))
    return _AVAILABLE[device]


def _slots(x: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
    """x (B, H, T, Dh) read in place as (tokens, H, Dh): slot t of row b, head h is element ``b * s0 + h * s1 +
    t * s2`` of its storage, so with row stride s2 and head stride s1, row b's slot t is "token" ``b * s0 / s2 + t``.
    Returns the view and s0 / s2, or None when the rows are not whole, disjoint strides apart (or Dh is not
    contiguous)."""
    B, H, T, D = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 <= 0 or (B > 1 and (s0 % s2 or s0 // s2 < T)):
        return None
    per_row = s0 // s2 if B > 1 else T
    return x.as_strided(((B - 1) * per_row + T, H, D), (s2, s1, 1)), per_row


def block_causal_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: BlockRuns) -> torch.Tensor:
    """q (B, Hq, Q, Dh) over k, v (B, Hkv, T, Dh) (Hq a multiple of Hkv) in the runs of :func:`block_runs`
    -> (B, Q, Hq * Dh), the heads concatenated (the output projection's input).

    The stored K/V are read in place (:func:`_slots`; the caches' storage is (B, Hkv, T, Dh)); K and V laid out
    differently (the fresh K/V of a forward without a cache) are copied to one layout first. Each run's keys start
    at its row's first token plus its first key."""
    B, Hq, Q, D = q.shape
    T = k.shape[2]
    ks, vs = _slots(k), _slots(v)
    if ks is None or vs is None or ks[1] != vs[1]:
        k, v = k.contiguous(), v.contiguous()
        ks, vs = _slots(k), _slots(v)
    (k_flat, per_row), (v_flat, _) = ks, vs
    cu_k = runs.key_offsets(per_row, k_flat.shape[0])
    q_flat = q.transpose(1, 2).reshape(B * Q, Hq, D)
    out = torch.ops.aten._flash_attention_forward(
        q_flat, k_flat, v_flat, runs.cu_q, cu_k, runs.max_q, T, 0.0, False, False, seqused_k=runs.key_count)[0]
    return out.reshape(B, Q, Hq * D)
