"""The transformer every model family shares, and the seam every cache meets it through.

LLaDA (arXiv:2502.09992) and Dream (arXiv:2508.15487) are both pre-norm Llama-style transformers with RMSNorm,
RoPE, SwiGLU and *bidirectional* attention; they differ in weight names, q/k/v bias, RoPE precision and in
which output row predicts which position (Dream is "adapted from AR": row i predicts position i+1). A family
file (``llada.py``, ``dream.py``) reads ``config.json`` into :class:`ModelArgs` and names the weights; the layer
loop, the residual structure and the head live here, written once. The MoE families (LLaDA-MoE, LLaDA2) swap
the MLP for :class:`MoE`; LLaDA2 also rotates only part of each head (``ModelArgs.partial_rotary_factor``).

Caches meet the model only through :class:`LayerHooks`, called by each layer (gpt-fast's ``KVCache`` verbs,
grown by what the approximate caches need):

- ``update(layer_idx, input_pos, k, v)``: store the fresh K/V of the rows being run at key slots ``input_pos``
  (given to :meth:`DiffusionLM.forward` explicitly) and return the K/V to attend to;
- ``layer_rows(layer_idx, layer, h)``: which rows of the residual stream this layer recomputes (a
  :class:`~lmeval_dllm.models.rows.RowSubset`; None = all), and ``reuse(layer_idx, kind, rows, out)``: the
  attention / FFN output to add to the stream, stored outputs for the rows not recomputed (dLLM-Cache);
- ``observe_attention(layer_idx, q, k)``: the queries and the keys attended to, for a cache that reads attention
  scores (d2Cache's rollout), when it sets ``needs_attention``;
- ``layer_input(layer_idx, h)``: the residual stream entering the layer; a cache may keep it, or substitute rows
  it stored (Elastic-Cache resumes a forward at its first drifting layer from the stored inputs of that layer).

The model never asks which cache it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmeval_dllm.models.flash import BlockRuns, block_causal_flash, block_runs, flash_supported
from lmeval_dllm.models.kernels import (add_rms_norm, kernel, norm_rope_fp32, norm_rope_native, rms_norm, rope_fp32,
                                        rope_native, storing, swiglu)
from lmeval_dllm.models.rows import RowSubset, gather_rope, gather_rows

# SDPA grew native grouped-query attention in torch 2.5; before that we expand K/V ourselves.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass(frozen=True)
class MoEArgs:
    """A mixture-of-experts MLP: a router over ``num_experts`` SwiGLU experts, each token's ``top_k`` best experts
    run and are summed, weighted by their router scores, plus an optional shared expert every token runs.

    The defaults are LLaDA-MoE's (OLMoE-style: softmax router, plain top-k, no bias, no scaling). LLaDA2.0
    (DeepSeek-V3-style, ``modeling_llada2_moe.py``'s ``LLaDA2MoeGate``) sets the rest: a sigmoid router, an expert
    score-correction bias that only chooses experts, group-limited top-k and a routed scaling factor."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: Optional[int]  # None: no shared expert
    norm_topk_prob: bool  # renormalise the top-k scores to sum to 1
    layers: tuple[bool, ...]  # per layer: True = MoE MLP, False = the dense MLP (ModelArgs.intermediate_size)
    score_function: str = "softmax"  # "softmax" (probabilities over the experts) | "sigmoid" (independent scores)
    expert_bias: bool = False  # a per-expert bias added to the scores to *choose* experts, not to weight them
    n_group: int = 1  # experts in n_group contiguous groups; a token may only pick from its topk_group best groups
    topk_group: int = 1  # (a group's score: the sum of its 2 best biased scores); n_group == topk_group: no limit
    routed_scaling_factor: float = 1.0  # multiplies the (renormalised) top-k weights
    norm_topk_eps: float = 0.0  # added to the sum when renormalising (LLaDA2: 1e-20)
    weights_fp32: bool = False  # weight and sum the k expert outputs in float32 (LLaDA2's moe_infer), not in
    # the activations' dtype (LLaDA-MoE)
    router_fp32: bool = False  # the router's matmul in float32 (LLaDA2), not in the model dtype (LLaDA-MoE)


@dataclass(frozen=True)
class ModelArgs:
    family: str  # the registered family's name ("llada", "dream"; lmeval_dllm.models.FAMILIES)
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the LM head (LLaDA: embedding_size, padded past the tokenizer's vocabulary)
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    rope_fp32: bool  # LLaDA rotates q/k in float32 (rope_full_precision); Dream in the model dtype (HF Qwen2)
    tie_embeddings: bool
    max_position: int
    mask_token_id: int
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    logit_shift: int  # 0: row i predicts position i (LLaDA); 1: row i-1 predicts position i (Dream)
    qk_norm: bool = False  # RMSNorm over each head's q and k (one weight of head_dim shared by the heads), before RoPE
    moe: Optional[MoEArgs] = None  # None: every layer has the dense SwiGLU MLP
    partial_rotary_factor: float = 1.0  # RoPE rotates the first int(factor * head_dim) dims of each head (LLaDA2: 0.5)
    attn_out_bias: bool = False  # the attention output projection has a bias (LLaDA2's use_bias)
    # None: bidirectional attention. An int: block-causal attention with blocks of that many canvas columns
    # (block diffusion: SDAR, TraDo, LLaDA2, Fast-dLLM v2's bd_size): column q attends to column k iff k // block_size <= q // block_size,
    # the trained block size; the decode loop aligns every row's blocks to canvas columns (generate.py).
    block_size: Optional[int] = None
    head_dim_override: Optional[int] = None  # config.json head_dim when it is not dim // n_heads (Qwen3, SDAR)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The dims of each head RoPE rotates (the first ones; the rest pass through unrotated)."""
        return int(self.head_dim * self.partial_rotary_factor)


class LayerHooks:
    """What a layer asks of a cache (see the module docstring). The defaults are those of no cache: attend to
    the rows' own K/V, recompute every row, read no attention scores."""

    needs_attention: bool = False  # call observe_attention in every layer

    def update(self, layer_idx: int, input_pos: Optional[torch.Tensor], k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, Q, Dh) of the rows run, to be stored at key slots ``input_pos`` ((Q,) or (B, Q) long);
        returns the K/V (B, Hkv, S, Dh) to attend to."""
        return k, v

    def kv_slots(self, layer_idx: int, input_pos: Optional[torch.Tensor]
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """When all ``update`` does is ``K[:, :, input_pos] = k; V[:, :, input_pos] = v`` into stores K, V
        (B, Hkv, S, Dh) and return them (``input_pos`` (Q,) slots): (K, V), so that a fused layer on the GPU
        writes its rotated keys and its values there from its RoPE kernel (``kernels.storing``: one kernel
        instead of three). None (the default): the layer calls ``update``."""
        return None

    def layer_rows(self, layer_idx: int, layer: "Block", h: torch.Tensor) -> Optional[RowSubset]:
        """The rows of ``h`` (B, T, D) that layer ``layer_idx`` recomputes; None = every row."""
        return None

    def reuse(self, layer_idx: int, kind: str, rows: RowSubset, out: Optional[torch.Tensor]) -> torch.Tensor:
        """With a row subset: what to add to the stream (B, T, D) after the attention (``kind="attn"``) or the
        FFN (``"mlp"``), given the fresh outputs ``out`` (B, M, D) of ``rows`` (None when no row runs)."""
        raise NotImplementedError("a cache that returns rows from layer_rows must implement reuse")

    def observe_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """q (B, Hq, Q, Dh) of the rows run and the keys k (B, Hkv, S, Dh) they attend to."""

    def layer_input(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """The stream h (B, Q, D) entering layer ``layer_idx`` -> the stream the layer runs on (same shape)."""
        return h


def block_causal(query_cols: torch.Tensor, keys: int, block_size: int,
                 attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The block-causal attention mask of block diffusion (SDAR, arXiv:2510.06303; the release's
    ``block_diffusion_attention_mask``): query column q attends to key column k iff ``k // block_size <= q //
    block_size`` (its own block bidirectionally, every earlier block), and-ed with ``attn_mask`` (key padding).

    A query always attends to its own column besides: a padding query whose block holds only padding keys would
    otherwise have no key at all (SDPA returns NaN there, and NaN values poison the real rows through 0 * NaN).
    A real query's own column is inside its block and not padding, so its row is unchanged.

    query_cols (1|B, Q) long canvas columns; keys: the number of key slots (key j = canvas column j);
    attn_mask (B, 1, 1|Q, keys) bool or None. Returns (1|B, 1, Q, keys) bool.
    """
    key_cols = torch.arange(keys, device=query_cols.device)
    allowed = (key_cols[None, None, :] // block_size) <= (query_cols[:, :, None] // block_size)  # (1|B, Q, S)
    if attn_mask is not None:
        allowed = allowed[:, None] & attn_mask
    else:
        allowed = allowed[:, None]
    return allowed | (key_cols[None, None, None, :] == query_cols[:, None, :, None])


@dataclass
class BlockQueries:
    """The canvas columns of the rows a forward runs (cols (1|B, Q) long, consecutive in each row), for
    block-causal attention, with what the layers build from them, built once per forward: every layer of a step sees
    the same query columns, key count and padding mask, and rebuilding per layer costs ~6 small kernels a layer, a
    visible share of a batch-1 step (docs/performance.md). ``memo``: (kind, key count) -> (padding mask, value)."""
    cols: torch.Tensor
    memo: dict = field(default_factory=dict)

    def once(self, kind: str, keys: int, attn_mask: Optional[torch.Tensor], build):
        """``build()`` the first time this forward asks for ``kind`` over ``keys`` with this padding mask."""
        hit = self.memo.get((kind, keys))
        if hit is not None and hit[0] is attn_mask:
            return hit[1]
        value = build()
        self.memo[(kind, keys)] = (attn_mask, value)
        return value

    def mask(self, keys: int, block_size: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """:func:`block_causal` for these queries over ``keys`` slots."""
        return self.once("mask", keys, attn_mask, lambda: block_causal(self.cols, keys, block_size, attn_mask))

    def runs(self, batch: int, keys: int, block_size: int, attn_mask: Optional[torch.Tensor]) -> BlockRuns:
        """:func:`~lmeval_dllm.models.flash.block_runs` of these queries; attn_mask (B, 1, 1, keys) or None."""
        window = None if attn_mask is None else attn_mask[:, 0, 0]
        return self.once("runs", keys, attn_mask, lambda: block_runs(self.cols, batch, keys, block_size, window))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the affine weight, as both families' HF code does."""

    def __init__(self, dim: int, eps: float, fuse: bool = True):
        super().__init__()
        self.eps, self.fuse = eps, fuse
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel(rms_norm, x, self.fuse)(x, self.weight, self.eps)


class Block(nn.Module):
    """One pre-norm transformer layer: ``h + Attn(norm(h))`` then ``h + MLP(norm(h))``.

    q/k/v and gate/up projections are fused on load (``wqkv``, ``w13``): one matmul instead of three/two.
    """

    def __init__(self, args: ModelArgs, layer_idx: int, fuse: bool = True):
        super().__init__()
        self.layer_idx, self.fuse = layer_idx, fuse
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_fp32 = args.rope_fp32
        self.block_size = args.block_size
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qkv_split = (q_dim, kv_dim, kv_dim)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, fuse)
        self.wqkv = nn.Linear(args.dim, q_dim + 2 * kv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(q_dim, args.dim, bias=args.attn_out_bias)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps, fuse)
        # Per-head q/k RMSNorm (LLaDA-MoE's qk_layernorm); None for LLaDA and Dream.
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps, fuse) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps, fuse) if args.qk_norm else None
        if args.moe is not None and args.moe.layers[layer_idx]:
            self.moe = MoE(args, fuse)
        else:
            self.moe = None
            self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # [gate; up]
            self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            stores: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None):
        """h (B, Q, D) -> q (B, Hq, Q, Dh), k and v (B, Hkv, Q, Dh); RoPE applied to q and k.

        ``stores`` = (K, V, slots): a cache's K/V stores (B, Hkv, S, Dh) and the slots (Q,) of these rows
        (``LayerHooks.kv_slots``): k and v are written there, and (q, K, V) returned."""
        B, Q, _ = h.shape
        q, k, v = self.wqkv(self.attn_norm(h)).split(self.qkv_split, dim=-1)
        q = q.view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # over head_dim, before RoPE (modeling_lladamoe.py: q_norm(q.reshape(-1, Dh)))
            rope = norm_rope_fp32 if self.rope_fp32 else norm_rope_native
            args = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin)
        else:  # LLaDA rotates in float32, Dream in the model dtype
            rope, args = (rope_fp32 if self.rope_fp32 else rope_native), (cos, sin)
        if stores is None:
            q, k = kernel(rope, q, self.fuse)(q, k, *args)
            return q, k, v
        k_store, v_store, slots = stores
        return kernel(storing(rope), q, self.fuse)(q, k, v, k_store, v_store, slots, *args), k_store, v_store

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, Q, D) -> v (B, Hkv, Q, Dh): the value projection alone, a third of ``qkv``'s cost for LLaDA
        (dLLM-Cache compares fresh and cached values to choose the rows it recomputes)."""
        B, Q, _ = h.shape
        start = self.qkv_split[0] + self.qkv_split[1]
        bias = None if self.wqkv.bias is None else self.wqkv.bias[start:]
        v = F.linear(self.attn_norm(h), self.wqkv.weight[start:], bias)
        return v.view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
               query_cols: Optional["BlockQueries"] = None):
        """q (B, Hq, Q, Dh) over k, v (B, Hkv, T, Dh); attn_mask (B, 1, 1|Q, T) bool, True = attend.

        Bidirectional, or block-causal when the model has a ``block_size``: then ``query_cols`` holds the canvas
        columns of the queries ((1|B, Q) long), key j is canvas column j, and :func:`block_causal` is combined
        with ``attn_mask``. On a GPU (fused model, half precision, a key-padding mask or none) that is flash
        attention over each block's visible keys (``models/flash.py``), without a mask. Returns the output
        projection (B, Q, D).
        """
        if self.block_size is not None:
            key_mask = attn_mask is None or attn_mask.shape[2] == 1  # (B, 1, 1, T): the canvas window
            if key_mask and self.fuse and flash_supported(q, k):
                runs = query_cols.runs(q.shape[0], k.shape[2], self.block_size, attn_mask)
                return self.wo(block_causal_flash(q, k, v, runs))
            attn_mask = query_cols.mask(k.shape[2], self.block_size, attn_mask)
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
            else:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        B, _, Q, _ = q.shape
        return self.wo(out.transpose(1, 2).reshape(B, Q, -1))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: w2(silu(gate(x)) * up(x)) on the normed input, or the mixture of experts (:class:`MoE`).
        (B, Q, D) -> (B, Q, D)."""
        return self.ffn(self.mlp_norm(h))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`mlp` of the already normed stream x (B, Q, D)."""
        if self.moe is not None:
            return self.moe(x)
        gate_up = self.w13(x)
        return self.w2(kernel(swiglu, gate_up, self.fuse)(gate_up))

    def kv_stores(self, cache: Optional[LayerHooks], input_pos: Optional[torch.Tensor],
                  h: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The cache's K/V stores for the fused RoPE kernel to write into (``LayerHooks.kv_slots``): on the GPU,
        fused; None elsewhere (``cache.update`` copies them)."""
        if cache is None or not (self.fuse and h.is_cuda):
            return None
        return cache.kv_slots(self.layer_idx, input_pos)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: Optional[torch.Tensor],
                cache: Optional[LayerHooks] = None, input_pos: Optional[torch.Tensor] = None,
                query_cols: Optional["BlockQueries"] = None) -> torch.Tensor:
        """h (B, Q, D) -> (B, Q, D). With a cache, the stream entering the layer goes through ``cache.layer_input``,
        K/V through ``cache.update`` at ``input_pos``; a cache that returns a row subset for this layer gets only
        those rows recomputed (their K/V at the subset's slots) and supplies the outputs of the others
        (``cache.reuse``). ``query_cols``: the rows' canvas columns (1|B, Q), for a block-causal model."""
        i = self.layer_idx
        if cache is not None:
            h = cache.layer_input(i, h)
        rows = None if cache is None else cache.layer_rows(i, self, h)
        if rows is None:
            stores = self.kv_stores(cache, input_pos, h)
            if stores is not None:
                q, k, v = self.qkv(h, cos, sin, (*stores, input_pos))
            else:
                q, k, v = self.qkv(h, cos, sin)
                if cache is not None:
                    k, v = cache.update(i, input_pos, k, v)
            if cache is not None and cache.needs_attention:
                cache.observe_attention(i, q, k)
            norm = self.mlp_norm
            h, x = kernel(add_rms_norm, h, self.fuse)(h, self.attend(q, k, v, attn_mask, query_cols), norm.weight,
                                                      norm.eps)
            return h + self.ffn(x)
        attn = None
        if rows.count:
            index = rows.index
            q, k, v = self.qkv(gather_rows(h, index), gather_rope(cos, index), gather_rope(sin, index))
            k, v = cache.update(i, rows.slots, k, v)
            if cache.needs_attention:
                cache.observe_attention(i, q, k)
            slots = rows.slots if rows.slots.dim() == 2 else rows.slots[None]
            attn = self.attend(q, k, v, attn_mask, BlockQueries(slots))
        h = h + cache.reuse(i, "attn", rows, attn)
        ffn = self.mlp(gather_rows(h, rows.index)) if rows.count else None
        return h + cache.reuse(i, "mlp", rows, ffn)


def _has_grouped_mm(device: torch.device) -> bool:
    """torch._grouped_mm's bfloat16 kernel: torch >= 2.8 on a Hopper (sm90) or newer GPU."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] >= 9


class MoE(nn.Module):
    """Mixture of SwiGLU experts with a top-k router, plus an optional shared expert: for each token x,

        s = score(router(x)) (softmax over the experts, or an elementwise sigmoid) in float32,
        e = the top_k experts of s + bias (only among the topk_group best of n_group expert groups),
        w = s[e] (/ sum(s[e]) if norm_topk_prob) * routed_scaling_factor,
        y = sum_j w_j * expert_{e_j}(x) + shared(x).

    LLaDA-MoE's ``LLaDAMoESparseMoeBlock`` (OLMoE's block) is the softmax router without bias, groups or scaling;
    LLaDA2's ``LLaDA2MoeSparseMoeBlock`` + ``LLaDA2MoeGate`` (DeepSeek-V3's routing, arXiv:2412.19437) is all of
    it: a float32 sigmoid router, the bias (``expert_bias``) that steers the choice but not the weights, groups
    scored by the sum of their two best biased scores, renormalised weights times 2.5, and the weighted sum over
    the k slots in float32 (``weights_fp32``).

    The experts' weights are stacked along dim 0 the way the loader fuses official tensors: ``w13`` (E * 2I, D) =
    [gate_0; up_0; gate_1; up_1; ...] and ``w2`` (E * D, I) = [down_0; down_1; ...].

    Three computations of the same sum: on the CPU a loop over the experts, each running the tokens routed to it,
    in the release's order (bit-equal to it in bfloat16 on the CPU); on a GPU in bfloat16, the (token, expert)
    pairs sorted by expert and two grouped matrix products (``torch._grouped_mm``); on any other GPU, every expert
    on every token. The GPU paths have no host sync and no Python loop, so CUDA graphs capture them.
    """

    def __init__(self, args: ModelArgs, fuse: bool = True):
        super().__init__()
        m = args.moe
        self.fuse = fuse
        self.num_experts, self.top_k, self.norm_topk_prob = m.num_experts, m.top_k, m.norm_topk_prob
        self.score_function, self.n_group, self.topk_group = m.score_function, m.n_group, m.topk_group
        self.scaling, self.norm_topk_eps, self.weights_fp32 = m.routed_scaling_factor, m.norm_topk_eps, m.weights_fp32
        self.router_fp32 = m.router_fp32
        self.inter = m.expert_intermediate_size
        self.gate = nn.Linear(args.dim, m.num_experts, bias=False)  # the router
        # (E,) the score-correction bias: float parameter loaded from the checkpoint (a buffer in the release)
        self.expert_bias = nn.Parameter(torch.zeros(m.num_experts)) if m.expert_bias else None
        self.w13 = nn.Parameter(torch.empty(m.num_experts * 2 * self.inter, args.dim))
        self.w2 = nn.Parameter(torch.empty(m.num_experts * args.dim, self.inter))
        self.shared_w13 = self.shared_w2 = None
        if m.shared_intermediate_size:
            self.shared_w13 = nn.Linear(args.dim, 2 * m.shared_intermediate_size, bias=False)
            self.shared_w2 = nn.Linear(m.shared_intermediate_size, args.dim, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> the top-k routing weights (N, k) (float32 if ``weights_fp32``, else x's dtype) and the
        experts chosen (N, k) long, best first."""
        if self.router_fp32:  # LLaDA2: F.linear(h.float(), W.float())
            logits = F.linear(x.float(), self.gate.weight.float())
        else:
            logits = self.gate(x)
        if self.score_function == "sigmoid":
            scores = torch.sigmoid(logits.float())  # (N, E)
        else:
            scores = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        if self.expert_bias is None and self.topk_group == self.n_group:
            weights, experts = scores.topk(self.top_k, dim=-1)
        else:
            choice = scores if self.expert_bias is None else scores + self.expert_bias
            if self.topk_group < self.n_group:
                choice = self.limit_groups(choice)
            experts = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, experts)  # the unbiased scores weight the experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.norm_topk_eps)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return (weights if self.weights_fp32 else weights.to(x.dtype)), experts

    def limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) -> the same with -inf outside each token's ``topk_group`` best groups of experts (a
        group = E / n_group consecutive experts, scored by the sum of its two best entries)."""
        N, E = choice.shape
        group_scores = choice.view(N, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return choice.masked_fill(~keep.repeat_interleave(E // self.n_group, dim=1), float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Q, D), already normed -> (B, Q, D)."""
        B, Q, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        weights, experts = self.route(flat)
        if not flat.is_cuda:
            out = self._looped(flat, weights, experts)
        elif flat.dtype == torch.bfloat16 and _has_grouped_mm(flat.device):
            out = self._grouped(flat, weights, experts)
        else:
            out = self._dense(flat, weights, experts)
        out = out.view(B, Q, D)
        if self.shared_w13 is not None:
            gate_up = self.shared_w13(x)
            out = out + self.shared_w2(kernel(swiglu, gate_up, self.fuse)(gate_up))
        return out

    @staticmethod
    def _combine(pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """pairs (N, k, D) expert outputs in (token, slot) order, weights (N, k) float32 -> (N, D): weighted and
        summed over the slots in float32, then cast back (LLaDA2's ``moe_infer``)."""
        return (pairs.float() * weights[..., None]).sum(dim=1).to(pairs.dtype)

    def _looped(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        (N, D), I, k = flat.shape, self.inter, self.top_k
        w13, w2 = self.w13.view(self.num_experts, 2 * I, D), self.w2.view(self.num_experts, D, I)
        out = flat.new_zeros(N, k, D) if self.weights_fp32 else torch.zeros_like(flat)
        for e in range(self.num_experts):
            token, slot = torch.where(experts == e)  # a token picks an expert at most once
            y = F.linear(swiglu(F.linear(flat[token], w13[e])), w2[e])  # (n_e, D)
            if self.weights_fp32:
                out[token, slot] = y
            else:  # weighted in x's dtype and added in expert order, as LLaDA-MoE's release does
                out.index_add_(0, token, y * weights[token, slot, None])
        return self._combine(out, weights) if self.weights_fp32 else out

    def _dense(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, the unchosen ones weighted 0: num_experts / top_k times the work, but
        static shapes (CUDA graphs) where the grouped kernel is missing (not bfloat16, or before Hopper)."""
        N, D = flat.shape
        E, I = self.num_experts, self.inter
        gate_up = torch.einsum("nd,efd->enf", flat, self.w13.view(E, 2 * I, D))  # (E, N, 2I)
        y = torch.bmm(swiglu(gate_up), self.w2.view(E, D, I).transpose(1, 2))  # (E, N, D)
        if self.weights_fp32:
            tokens = torch.arange(N, device=flat.device)[:, None]  # (N, 1)
            return self._combine(y[experts, tokens], weights)  # y[experts, tokens]: (N, k, D)
        weight = torch.zeros(N, E, dtype=flat.dtype, device=flat.device).scatter(1, experts, weights)  # (N, E)
        return (y * weight.T[..., None]).sum(dim=0)

    def _grouped(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        N, D = flat.shape
        E, I, k = self.num_experts, self.inter, self.top_k
        pair_expert = experts.reshape(-1)  # (N*k,) the expert of each (token, slot) pair
        order = pair_expert.argsort(stable=True)  # pairs grouped by expert
        counts = torch.zeros(E, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, pair_expert, torch.ones_like(pair_expert, dtype=torch.int32))  # no host sync
        offs = counts.cumsum(0, dtype=torch.int32)  # (E,) end of each expert's group
        xs = flat[order // k]  # (N*k, D)
        w13 = self.w13.view(E, 2 * I, D).transpose(1, 2)  # (E, D, 2I)
        w2 = self.w2.view(E, D, I).transpose(1, 2)  # (E, I, D)
        h = torch._grouped_mm(xs, w13, offs=offs)  # (N*k, 2I)
        h = torch._grouped_mm(swiglu(h), w2, offs=offs)  # (N*k, D)
        if self.weights_fp32:
            pairs = torch.empty_like(h).index_copy_(0, order, h)  # (token, slot) order
            return self._combine(pairs.view(N, k, D), weights)
        h = h * weights.reshape(-1)[order, None]
        pairs = torch.empty_like(h).index_copy_(0, order, h)  # back to (token, slot) order: deterministic sum
        return pairs.view(N, k, D).sum(dim=1)


class DiffusionLM(nn.Module):
    """A masked-diffusion LM: token ids in, logits per position out, bidirectional attention.

    ``predict`` is what the decode loop calls: it takes the canvas rows that are run and the *target* columns
    whose token distributions the sampler needs, and hides the family's logit shift, so samplers always see
    "logits of position i" at index i.

    Args:
        args: the architecture (from the family's ``parse_config``).
        fuse: run the elementwise stages as fused CUDA kernels (``models/kernels.py``), and block-causal
            attention in half precision on flash attention's variable-length kernel (``models/flash.py``); no
            effect on the CPU. False: the plain ops (the GPU tests' reference).
    """

    def __init__(self, args: ModelArgs, *, fuse: bool = True):
        super().__init__()
        self.args, self.fuse = args, fuse
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, fuse) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, fuse)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        a, d = self.args, self.args.rope_dim  # partial RoPE: the frequencies of the rotated dims only (HF's rule)
        return 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def init_buffers(self, device) -> None:
        """Recompute non-persistent buffers after building on the meta device and loading weights."""
        self.inv_freq = self._inv_freq(device)

    @property
    def logit_shift(self) -> int:
        return self.args.logit_shift

    @property
    def mask_token_id(self) -> int:
        return self.args.mask_token_id

    @property
    def block_size(self) -> Optional[int]:
        """None: bidirectional attention; an int: block-causal over blocks of that size (block diffusion)."""
        return self.args.block_size

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def rope(self, position_ids: torch.Tensor):
        """position_ids (B, Q) -> cos, sin (B, 1, Q, R) in float32, R = ``args.rope_dim`` (= Dh unless RoPE is
        partial)."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, Q, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, Q, R)
        return emb.cos(), emb.sin()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head. h (B, K, D) -> logits (B, K, V) in the model dtype."""
        return self.output(self.norm(h))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerHooks] = None,
        logits_index: Optional[slice | torch.Tensor] = None,
        *,
        input_pos: Optional[torch.Tensor] = None,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Run rows through the stack.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, Q)`): the rows to run (the whole canvas, or the subset
                a cache recomputes).
            position_ids (`torch.LongTensor` of shape `(B, Q)`): RoPE positions of those rows (None if ``rope``
                is given).
            attention_mask (`torch.BoolTensor`, *optional*): True = may attend. Either a key-padding mask
                `(B, T)` over the keys attended to (T = Q without a cache, the full canvas with one), or a full
                mask `(B, 1, Q, T)` for structured attention (e.g. WINO's leave-one-out shadow block).
            cache: the cache's :class:`LayerHooks`; None = the rows attend to their own K/V only.
            logits_index: which of the Q rows get logits (a slice, or a `(K,)` LongTensor of row indices); all
                when None. The LM head is the largest matmul of a step (126k x 4096 for LLaDA), so it only runs
                where a sampler looks.
            input_pos (`torch.LongTensor` of shape `(Q,)` or `(B, Q)`, *optional*): the key slots the rows' K/V
                are written to (``cache.update``).
            rope: precomputed ``(cos, sin)`` of ``position_ids`` (`(B, 1, Q, Dh)` float32, :meth:`rope`), for a
                cache that keeps the table of its canvas.
            hidden: return the final hidden states (B, K, D) before the norm and head instead of logits (a
                cache that runs the head in chunks).

        Returns:
            logits (`torch.Tensor` of shape `(B, K, V)`), K = rows selected by ``logits_index``.
        """
        h = self.tok_embeddings(input_ids)  # (B, Q, D)
        cos, sin = rope if rope is not None else self.rope(position_ids)
        mask = attention_mask
        if mask is not None and mask.dim() == 2:
            mask = mask[:, None, None, :]  # (B, 1, 1, T)
        query_cols = None
        if self.args.block_size is not None:  # the rows' canvas columns: the key slots they write, or 0..Q-1
            if input_pos is None:
                query_cols = BlockQueries(torch.arange(input_ids.shape[1], device=input_ids.device)[None])
            else:
                query_cols = BlockQueries(input_pos if input_pos.dim() == 2 else input_pos[None])
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, input_pos, query_cols)
        if logits_index is not None:
            h = h[:, logits_index]
        return h if hidden else self.head(h)

    def predict(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        targets: slice,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerHooks] = None,
        query_start: int = 0,
    ) -> torch.Tensor:
        """Logits for the canvas columns ``targets``, aligned so that index i is the distribution of column
        ``targets.start + i``.

        ``input_ids`` holds canvas columns ``[query_start, query_start + Q)``. Dream reads column t from row
        t - 1, so for Dream those rows must include ``targets.start - 1`` (the caches account for this).
        """
        start = targets.start - self.logit_shift - query_start
        stop = targets.stop - self.logit_shift - query_start
        if start < 0 or stop > input_ids.shape[1]:
            raise ValueError(
                f"targets [{targets.start}, {targets.stop}) need rows [{start + query_start}, {stop + query_start}) "
                f"but rows [{query_start}, {query_start + input_ids.shape[1]}) were given"
                + (" (Dream predicts column t from row t-1: the prompt must not be empty)" if self.logit_shift else "")
            )
        return self(input_ids, position_ids, attention_mask, cache, logits_index=slice(start, stop))
