"""dLLM-Cache: adaptive feature caching (Liu et al., "dLLM-Cache: Accelerating Diffusion Large Language Models with
Adaptive Caching", arXiv:2506.06295; maomaocun/dLLM-cache ``dllm_cache/hooks/cache_hook_LLaDA.py``,
``cache_hook_Dream.py``, ``dllm_cache/cache/Cache.py``).

Every layer keeps, for every position, its K, V, attention output and FFN output. The residual stream always
spans the whole canvas; a position that is not recomputed in a layer adds its cached attention and FFN outputs to
the current residual. Per forward pass ``n`` of a row (0-based, counting the passes in which the row decodes):

- prompt rows are recomputed when ``n % kp == 0``; the response (the whole generation region) when
  ``n % kr == 0``;
- otherwise, with ``rou > 0``, the value projection of every response row is recomputed, compared with the
  cached values (cosine similarity over the whole value vector), and the ``int(rou * gen_length)`` least similar
  rows are recomputed (query, key, attention, FFN); the fresh values of *all* response rows replace the cached
  ones, the keys only of the recomputed rows;
- layer 0 is always recomputed in full (as the released hooks do: ``or self.layer_id == 0``).

Attention of recomputed rows is over the full cached K/V with the fresh parts written in. As in the released code,
keys are cached after RoPE is applied (identical to re-applying RoPE to cached pre-RoPE keys).

Differences from the released code, on purpose: the schedule counts each batch row's own forward passes (the
release uses one global counter), and a row that does not decode in a step (its block is finished while others
continue) keeps its cache untouched, so a batch gives exactly what each prompt gives alone; padded keys are
masked (the release's LLaDA hook attends without the padding mask); ties in the similarity ranking go to the lower
position.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmeval_dllm.caches.base import Cache, ExtraRows, target_rows
from lmeval_dllm.caches.rows import (gather_rope, gather_rows, rank_ascending, scatter_heads_, scatter_rows_,
                                     store_index)
from lmeval_dllm.models.common import DiffusionLM
from lmeval_dllm.samplers.base import DecodeState


class DLLMCache(Cache):
    """Prompt features refreshed every ``kp`` steps, response features every ``kr`` steps, and in between the
    ``rou`` fraction of response rows whose values changed most.

    Args:
        kp: prompt refresh interval in forward passes (>= 1). Default 50, the released GSM8K script for
            LLaDA-8B-Instruct.
        kr: response refresh interval (>= 1). Default 7 (same script). ``kp=1, kr=1`` is the exact computation.
        rou: fraction of the generation region recomputed at the steps in between, in [0, 1]. Default 0.25
            (every released script); 0 reuses the cached response features unchanged.

    Storage per layer: K, V `(B, Hkv, T + 1, Dh)`, attention and FFN outputs `(B, T + 1, D)` (slot T is the trash
    slot of ``caches/rows.py``); LLaDA-8B at T = 512: 1 GiB per batch row. Allocated when the batch shape changes.
    """

    name = "dllm"
    lacks = {
        "extra_rows": "the dllm cache keeps per-position features of canvas rows only",
        "resize": "the dllm cache's features are stored by canvas position and would all have to be rebuilt",
    }

    def __init__(self, *, kp: int = 50, kr: int = 7, rou: float = 0.25):
        super().__init__()
        if kp < 1:
            raise ValueError(f"kp must be an integer >= 1, got {kp}")
        if kr < 1:
            raise ValueError(f"kr must be an integer >= 1, got {kr}")
        if not 0.0 <= rou <= 1.0:
            raise ValueError(f"rou must be in [0, 1], got {rou!r}")
        self.kp, self.kr, self.rou = kp, kr, rou
        self.k = self.v = self.attn = self.ffn = None

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        a = model.args
        B, T = state.x.shape
        kv_shape = (a.n_layers, B, a.n_kv_heads, T + 1, a.head_dim)
        if self.k is None or tuple(self.k.shape) != kv_shape or self.k.dtype != model.dtype \
                or self.k.device != model.device:
            self.k = self.v = self.attn = self.ffn = None
            self.k = torch.zeros(kv_shape, dtype=model.dtype, device=model.device)
            self.v = torch.zeros_like(self.k)
            self.attn = torch.zeros(a.n_layers, B, T + 1, a.dim, dtype=model.dtype, device=model.device)
            self.ffn = torch.zeros_like(self.attn)
        self.graphs.reset()  # the per-call tensors below get new addresses
        self.prompt_len, self.length = state.prompt_len, T
        self.n_adapt = int(self.rou * (T - state.prompt_len))  # the release's int(gen_len * transfer_ratio)
        self.passes = [0] * B  # per row: forward passes in which it decoded (host copy, decides shapes)
        self.passes_dev = torch.zeros(B, dtype=torch.long, device=model.device)  # the same, for the graph
        self.cos, self.sin = model.rope(state.position_ids)  # (B, 1, T, Dh): gathered per layer

    def row_counts(self, active: list[bool]) -> tuple[int, bool]:
        """(rows run per batch row in layers >= 1, whether any row ranks its response rows by similarity)."""
        P, G = self.prompt_len, self.length - self.prompt_len
        most, rank = 0, False
        for on, n in zip(active, self.passes):
            if on:
                refresh_gen = n % self.kr == 0
                most = max(most, P * (n % self.kp == 0) + (G if refresh_gen else self.n_adapt))
                rank |= not refresh_gen and self.n_adapt > 0
        return most, rank

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> torch.Tensor:
        if extra is not None or state.x.shape[1] != self.length:
            raise RuntimeError("the dllm cache runs canvas rows of a fixed length only (check_compatible)")
        B = state.x.shape[0]
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        on = active.tolist()  # the loop has just synced on `active`: this read costs no extra wait
        most, rank = self.row_counts(on)
        rows = target_rows(model, targets, 0, self.length)
        mask = () if state.attention_mask is None else (state.attention_mask,)
        key = (B, self.length, most, rank, rows.start, rows.stop, len(mask))
        logits = self.graphs.run(key, lambda x, act, *m: self._forward(model, x, act, m, most, rank, rows),
                                 state.x, active, *mask)
        self.passes = [n + a for n, a in zip(self.passes, on)]
        return logits

    def _forward(self, model, x, active, mask, most: int, rank: bool, rows: slice) -> torch.Tensor:
        """x (B, T), active (B,) -> logits (B, len(rows), V). ``most``/``rank``: see :meth:`row_counts`."""
        B, T = x.shape
        P, G = self.prompt_len, T - self.prompt_len
        attn_mask = mask[0][:, None, None, :] if mask else None  # (B, 1, 1, T)
        n = self.passes_dev
        refresh_prompt = active & (n % self.kp == 0)
        refresh_gen = active & (n % self.kr == 0)
        adaptive = active & ~refresh_gen & (self.n_adapt > 0)
        count = P * refresh_prompt.long() + torch.where(refresh_gen, G, self.n_adapt) * active.long()  # (B,)
        every = torch.arange(T, device=x.device).expand(B, T)
        h = model.tok_embeddings(x)  # (B, T, D)
        for i, layer in enumerate(model.layers):
            if i == 0:  # always recomputed in full (released hooks)
                index, real = every, active[:, None].expand(B, T)
            elif most == 0:
                h = h + self.attn[i, :, :T] + self.ffn[i, :, :T]  # nothing recomputed: cached outputs only
                continue
            else:
                # Order positions by priority; each row's first `count` are its recomputed rows.
                prio = torch.empty(B, T, device=x.device)
                prio[:, :P] = torch.where(refresh_prompt, 4.0, 0.0)[:, None]
                if rank:
                    v_new = layer.values(h[:, P:])  # (B, Hkv, G, Dh)
                    v_old = self.v[i, :, :, P:T]
                    sim = F.cosine_similarity(v_new.transpose(1, 2).flatten(2).float(),
                                              v_old.transpose(1, 2).flatten(2).float(), dim=-1)  # (B, G)
                    gen_prio = 2.0 - rank_ascending(sim) / G  # least similar first, in (1, 2]
                    # Adaptive rows take every fresh value (the release's kv_cache_gen["v"] = v_gen).
                    self.v[i, :, :, P:T] = torch.where(adaptive[:, None, None, None], v_new, v_old)
                else:
                    gen_prio = torch.ones(B, G, device=x.device)
                prio[:, P:] = torch.where(refresh_gen[:, None], 3.0, gen_prio)
                index = torch.sort(prio, dim=-1, descending=True, stable=True).indices[:, :most]  # (B, M)
                real = torch.arange(most, device=x.device)[None, :] < count[:, None]
            h = self._layer(layer, i, h, index, real, attn_mask)
        self.passes_dev += active.long()
        return model.head(h[:, rows])

    def _layer(self, layer, i: int, h: torch.Tensor, index: torch.Tensor, real: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """One layer: recompute rows ``index`` (B, M) (``real`` (B, M) of them count), reuse the others."""
        T = h.shape[1]
        slots = store_index(index, real, T)
        q, k, v = layer.qkv(gather_rows(h, index), gather_rope(self.cos, index), gather_rope(self.sin, index))
        scatter_heads_(self.k[i], slots, k)
        scatter_heads_(self.v[i], slots, v)
        scatter_rows_(self.attn[i], slots, layer.attend(q, self.k[i, :, :, :T], self.v[i, :, :, :T], attn_mask))
        h = h + self.attn[i, :, :T]
        scatter_rows_(self.ffn[i], slots, layer.mlp(gather_rows(h, index)))
        return h + self.ffn[i, :, :T]
