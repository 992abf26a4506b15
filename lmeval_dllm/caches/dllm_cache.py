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

It runs through the model's own layer loop: per layer, :meth:`DLLMCache.layer_rows` names the rows recomputed (a
:class:`~lmeval_dllm.models.rows.RowSubset`), ``update`` writes their K/V, and ``reuse`` returns the attention /
FFN outputs to add to the residual stream (the stored ones, with the fresh rows written in). Attention of
recomputed rows is over the full cached K/V with the fresh parts written in. As in the released code,
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

from lmeval_dllm.caches.base import PositionStoreCache, target_rows
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.models.rows import RowSubset, rank_ascending, scatter_rows_
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits


class DLLMCache(PositionStoreCache):
    """Prompt features refreshed every ``kp`` steps, response features every ``kr`` steps, and in between the
    ``rou`` fraction of response rows whose values changed most.

    Args:
        kp: prompt refresh interval in forward passes (>= 1). Default 50, the released GSM8K script for
            LLaDA-8B-Instruct.
        kr: response refresh interval (>= 1). Default 7 (same script). ``kp=1, kr=1`` is the exact computation.
        rou: fraction of the generation region recomputed at the steps in between, in [0, 1]. Default 0.25
            (every released script); 0 reuses the cached response features unchanged.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage per layer: K, V `(B, Hkv, T + 1, Dh)`, attention and FFN outputs `(B, T + 1, D)` (slot T is the trash
    slot of ``models/rows.py``); LLaDA-8B at T = 512: 1 GiB per batch row. Allocated when the batch shape changes.
    """

    name = "dllm"
    block_causal = (
        "it reuses stale attention and FFN outputs chosen for full (bidirectional) attention; a "
        "block-diffusion model's finished blocks are already exact"
    )
    lacks = {
        "extra_rows": "the dllm cache keeps per-position features of canvas rows only",
        "resize": "the dllm cache's features are stored by canvas position and would all have to be rebuilt",
    }

    def __init__(self, *, kp: int = 50, kr: int = 7, rou: float = 0.25, cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
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
        self.passes_dev = torch.zeros(B, dtype=torch.long, device=model.device)  # per row: passes it decoded in
        self.cos, self.sin = model.rope(state.position_ids)  # (B, 1, T, Dh), for every step of the call
        self._plan = None

    def row_counts(self, active: torch.Tensor) -> torch.Tensor:
        """(2,) long on the device: (rows run per batch row in layers >= 1, whether any row ranks its response
        rows by similarity). Read once per step (the step's shapes depend on it)."""
        P, G, n = self.prompt_len, self.length - self.prompt_len, self.passes_dev
        refresh_gen = n % self.kr == 0
        rows = P * (n % self.kp == 0).long() + torch.where(refresh_gen, G, self.n_adapt)
        most = torch.where(active, rows, 0).amax()
        rank = (active & ~refresh_gen).any() & (self.n_adapt > 0)
        return torch.stack([most, rank.long()])

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        if extra is not None or state.x.shape[1] != self.length:
            raise RuntimeError("the dllm cache runs canvas rows of a fixed length only (check_compatible)")
        B = state.x.shape[0]
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        most, rank = self.row_counts(active).tolist()  # the step's one host read
        rows = target_rows(model, targets, 0, self.length)
        mask = () if state.attention_mask is None else (state.attention_mask,)
        key = (B, self.length, most, bool(rank), rows.start, rows.stop, len(mask))
        logits = self.graphs.run(key, lambda x, act, *m: self._forward(model, x, act, m, most, bool(rank), rows),
                                 state.x, active, *mask)
        return StepLogits(logits)

    def _forward(self, model, x, active, mask, most: int, rank: bool, rows: slice) -> torch.Tensor:
        """x (B, T), active (B,) -> logits (B, len(rows), V). ``most``/``rank``: see :meth:`row_counts`."""
        B, T = x.shape
        P, G = self.prompt_len, T - self.prompt_len
        n = self.passes_dev
        refresh_prompt = active & (n % self.kp == 0)
        refresh_gen = active & (n % self.kr == 0)
        self._plan = dict(
            active=active, refresh_prompt=refresh_prompt, refresh_gen=refresh_gen, most=most, rank=rank,
            adaptive=active & ~refresh_gen & (self.n_adapt > 0),
            count=P * refresh_prompt.long() + torch.where(refresh_gen, G, self.n_adapt) * active.long(),  # (B,)
        )
        logits = model(x, None, mask[0] if mask else None, self, rows, rope=(self.cos, self.sin))
        self._plan = None
        self.passes_dev += active.long()
        return logits

    # -- the model's layer hooks ------------------------------------------------------------------------------

    def layer_rows(self, layer_idx: int, layer, h: torch.Tensor) -> RowSubset:
        """Rows of the stream h (B, T, D) recomputed in this layer: every row in layer 0 (the released hooks),
        otherwise each row's first ``count`` positions by priority (refreshed prompt, refreshed response, then
        the response rows whose values changed most)."""
        plan, i = self._plan, layer_idx
        B, T, _ = h.shape
        P, G = self.prompt_len, T - self.prompt_len
        if i == 0:  # always recomputed in full (released hooks)
            every = torch.arange(T, device=h.device).expand(B, T)
            return RowSubset(every, plan["active"][:, None].expand(B, T), T)
        most = plan["most"]
        if most == 0:  # nothing recomputed: cached outputs only
            empty = torch.zeros(B, 0, dtype=torch.long, device=h.device)
            return RowSubset(empty, empty.bool(), T)
        # Order positions by priority; each row's first `count` are its recomputed rows.
        prio = torch.empty(B, T, device=h.device)
        prio[:, :P] = torch.where(plan["refresh_prompt"], 4.0, 0.0)[:, None]
        if plan["rank"]:
            v_new = layer.values(h[:, P:])  # (B, Hkv, G, Dh)
            v_old = self.v[i, :, :, P:T]
            sim = F.cosine_similarity(v_new.transpose(1, 2).flatten(2).float(),
                                      v_old.transpose(1, 2).flatten(2).float(), dim=-1)  # (B, G)
            gen_prio = 2.0 - rank_ascending(sim) / G  # least similar first, in (1, 2]
            # Adaptive rows take every fresh value (the release's kv_cache_gen["v"] = v_gen).
            self.v[i, :, :, P:T] = torch.where(plan["adaptive"][:, None, None, None], v_new, v_old)
        else:
            gen_prio = torch.ones(B, G, device=h.device)
        prio[:, P:] = torch.where(plan["refresh_gen"][:, None], 3.0, gen_prio)
        index = torch.sort(prio, dim=-1, descending=True, stable=True).indices[:, :most]  # (B, M)
        real = torch.arange(most, device=h.device)[None, :] < plan["count"][:, None]
        return RowSubset(index, real, T)

    def reuse(self, layer_idx: int, kind: str, rows: RowSubset, out: Optional[torch.Tensor]) -> torch.Tensor:
        """The stored attention or FFN outputs (B, T, D) of every position, with the fresh ``out`` (B, M, D) of
        the recomputed rows written in first."""
        store = (self.attn if kind == "attn" else self.ffn)[layer_idx]
        if out is not None:
            scatter_rows_(store, rows.slots, out)
        return store[:, :self.length]
