"""The cache interface, the no-cache baseline, and the rule that says which strategy can use which cache.

A cache decides, each step, which canvas rows run through the transformer and supplies what the other rows
contribute. It meets the model only through the layer hooks of :class:`~lmeval_dllm.models.LayerHooks`, which
:class:`Cache` implements: ``update(layer_idx, input_pos, k, v)`` stores the fresh K/V of the rows being run at
the key slots ``input_pos`` the cache passed to ``model(..., input_pos=...)`` and returns the K/V to attend to
(gpt-fast's ``KVCache.update``); ``layer_rows`` / ``reuse`` recompute a subset of rows in a layer and reuse stored
attention / FFN outputs for the others (dLLM-Cache); ``observe_attention`` sees each layer's queries and keys
(d2Cache's rollout). The layer loop itself is the model's. Lifecycle hooks have no-op defaults. Storage is
allocated in :meth:`Cache.setup` (once per batch shape) and reused for every step.

:meth:`Cache.forward` returns a :class:`~lmeval_dllm.state.StepLogits`: the logits of the asked-for columns and,
when the cache did not recompute all of them, which are real (``fresh``); the loop hands that to the sampler as
``state.fresh``.

What a strategy does to use a cache:

- nothing, if it decodes with the usual forward (``Sampler.forward`` -> ``cache.forward(model, state, span)``)
  and picks its candidates with ``state.candidates(span)`` (which excludes columns whose logits a cache did not
  recompute);
- a strategy that runs rows that are not part of the canvas (WINO's shadow block) passes them as
  :class:`~lmeval_dllm.state.ExtraRows` to ``cache.forward(model, state, span, extra=...)`` and declares
  ``cache_needs = frozenset({"extra_rows"})``;
- a strategy that changes the canvas length while decoding (DAEDAL) returns a
  :class:`~lmeval_dllm.state.CanvasEdit` with its step and declares ``cache_needs = {"resize"}``; a cache notices
  the new length at its next forward.

:func:`check_compatible` rejects, before any model work, a cache that lacks something the strategy needs.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Union

import torch

from lmeval_dllm.caches.graphs import StepGraphs
from lmeval_dllm.models import DiffusionLM, LayerHooks
from lmeval_dllm.models.rows import scatter_heads_
from lmeval_dllm.samplers.base import Sampler
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits, StepOutput

# What a strategy may need from a cache besides the usual forward (``Sampler.cache_needs``).
FEATURES: dict[str, str] = {
    "extra_rows": "runs rows that are not part of the canvas alongside it (WINO's leave-one-out shadow block)",
    "resize": "changes the canvas length while decoding (DAEDAL inserts masks)",
    "decoded_logits": "revises decoded tokens of the block from each pass's logits of those columns (LLaDA2.1's "
                      "token editing)",
}


def check_compatible(sampler: Sampler | type[Sampler], cache: Cache | type[Cache]) -> None:
    """Raise ValueError if the strategy needs something the cache cannot do (e.g. WINO with dllm)."""
    for feature in sorted(sampler.cache_needs):
        if feature not in FEATURES:
            raise ValueError(f"strategy {sampler.name!r} declares an unknown cache need {feature!r}; "
                             f"known: {', '.join(FEATURES)}")
        if feature in cache.lacks:
            raise ValueError(
                f"strategy {sampler.name!r} cannot be used with cache={cache.name!r}: the strategy "
                f"{FEATURES[feature]}, and {cache.lacks[feature]}. Use a cache that supports it "
                f"(cache=none, prefix or dual)."
            )


def key_padding(state: DecodeState, keys: int) -> torch.Tensor:
    """(B, keys) bool: the canvas key-padding mask padded with ``True`` (or all True without padding)."""
    B, T = state.x.shape
    if state.attention_mask is None:
        return torch.ones(B, keys, dtype=torch.bool, device=state.x.device)
    if keys == T:
        return state.attention_mask
    return torch.cat([state.attention_mask, state.attention_mask.new_ones(B, keys - T)], dim=1)


def extended_mask(state: DecodeState, extra: ExtraRows, query_cols: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q + E, T + E) bool attention mask for canvas query columns ``query_cols`` (Q,) followed by the
    extra rows: canvas rows see the canvas keys (minus padding) and no extra key; extra rows see ``extra.sees``."""
    B, T = state.x.shape
    E = extra.count
    canvas = torch.cat([key_padding(state, T), state.x.new_zeros(B, E, dtype=torch.bool)], dim=1)  # (B, T + E)
    rows = torch.cat([canvas[:, None, :].expand(B, query_cols.numel(), T + E), extra.sees.bool()], dim=1)
    return rows[:, None]


def target_rows(model: DiffusionLM, targets: slice, q0: int, q1: int) -> slice:
    """Rows (relative to the run rows ``[q0, q1)``) whose outputs predict the canvas columns ``targets``.

    Dream predicts column t from row t - 1. Raises if the run rows do not cover them all.
    """
    start, stop = targets.start - model.logit_shift, targets.stop - model.logit_shift
    if start < q0 or stop > q1:
        raise ValueError(
            f"targets [{targets.start}, {targets.stop}) need rows [{start}, {stop}) but rows [{q0}, {q1}) are run"
            + (" (Dream predicts column t from row t-1: the prompt must not be empty)" if model.logit_shift else "")
        )
    return slice(start - q0, stop - q0)


def stored_column_logits(cache: "Cache", model: DiffusionLM, state: DecodeState, q0: int, column: int) -> torch.Tensor:
    """Run canvas rows ``[q0, column)`` with ``cache``'s layer hooks (each row's K/V written at its own column, as
    ``update`` stores them) and return the logits (B, V) of ``column`` (from row ``column - logit_shift``): the pass
    that stores a finished block (``Cache.block_start_logits`` of the caches that keep finished blocks' K/V)."""
    device = state.x.device
    write = torch.arange(q0, column, device=device)
    index = torch.tensor([column - model.logit_shift - q0], device=device)
    mask = () if state.attention_mask is None else (state.attention_mask,)

    def run(ids, pos, write, index, *mask):
        return model(ids, pos, mask[0] if mask else None, cache, index, input_pos=write)

    key = ("store", *state.x.shape, column - q0, len(mask))
    return cache.graphs.run(key, run, state.x[:, q0:column], state.position_ids[:, q0:column], write, index,
                            *mask)[:, 0]


# Constructor options of every cache that are engine settings, not the method's parameters (``cache_params``
# leaves them out; ``--model_args`` sets them for the model and the cache together).
ENGINE_OPTIONS = ("cuda_graphs",)


class Cache(LayerHooks):
    """No cache: every step runs the whole canvas (the exact reference computation).

    Args:
        cuda_graphs: replay each step's forward as a CUDA graph (``caches/graphs.py``); no effect on the CPU.

    Capabilities, read once by :func:`check_compatible` (never ``isinstance``):

    - ``lacks``: ``{feature: why}`` for each :data:`FEATURES` entry this cache cannot provide.
    - ``block_causal``: True if it serves a block-causal model exactly, else the reason it cannot;
      ``needs_block_causal``: it serves only such models.
    """

    name: ClassVar[str] = "none"
    lacks: ClassVar[dict[str, str]] = {}
    # True: gives a block-causal model (``ModelArgs.block_size``, block diffusion) its exact attention; otherwise
    # why not (read by ``generate.check_block_causal`` before any model work).
    block_causal: ClassVar[Union[bool, str]] = True
    needs_block_causal: ClassVar[bool] = False  # only a block-causal model can use it (cache=block)

    def __init__(self, *, cuda_graphs: bool = True) -> None:
        self.cuda_graphs = cuda_graphs
        self.graphs = StepGraphs(enabled=cuda_graphs)
        self._shape: Optional[tuple] = None

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        """Called once per ``generate`` call, after the canvas is built: allocate (or reuse) storage here.

        The no-cache path keeps the graph of one canvas shape: a new shape drops the old graphs (each holds
        its activation memory; lm-eval batches come in many prompt lengths)."""
        shape = (*state.x.shape, model.dtype, model.device)
        if shape != self._shape:
            self.graphs.reset()
            self._shape = shape

    def begin_block(self, state: DecodeState) -> None:
        """Called when a block starts."""

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        """Logits (B, len(targets) [+ E], V) of the canvas columns ``targets`` for this step, followed by the
        logits of the ``extra`` rows if any, and the columns that are real predictions (``StepLogits.fresh``;
        columns a cache did not recompute come back as zeros)."""
        T = state.x.shape[1]
        rows = target_rows(model, targets, 0, T)
        if extra is not None:
            cols = torch.arange(T, device=state.x.device)
            ids = torch.cat([state.x, extra.ids], dim=1)
            pos = torch.cat([state.position_ids, extra.position_ids], dim=1)
            index = torch.cat([cols[rows], T + torch.arange(extra.count, device=cols.device)])
            return StepLogits(model(ids, pos, extended_mask(state, extra, cols), None, logits_index=index))
        if state.x.device.type != "cuda" or not self.graphs.enabled:
            return StepLogits(model.predict(state.x, state.position_ids, targets, attention_mask=state.attention_mask))
        index = torch.arange(rows.start, rows.stop, device=state.x.device)  # a tensor: one graph for all blocks
        mask = () if state.attention_mask is None else (state.attention_mask,)
        key = ("full", *state.x.shape, index.numel(), len(mask))
        return StepLogits(self.graphs.run(key, lambda x, pos, idx, *m: model(x, pos, m[0] if m else None, None, idx),
                                          state.x, state.position_ids, index, *mask))

    def block_start_logits(self, model: DiffusionLM, state: DecodeState, column: int) -> torch.Tensor:
        """Logits (B, V) of canvas column ``column``, the first of an attention block whose left neighbour is
        decoded (Fast-dLLM v2's greedy block start, ``generate.commit_block_start``): the release's pass that
        stores the finished block's K/V. Here: the whole canvas, as every step of this cache; the caches that keep
        the K/V of finished blocks (cache=block) write them in this pass."""
        return model.predict(state.x, state.position_ids, slice(column, column + 1),
                             attention_mask=state.attention_mask)[:, 0]

    def end_step(self, state: DecodeState, out: StepOutput) -> None:
        """Called after the sampler's decision was applied to ``state.x``."""


def copy_to_slots(stores: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``update`` of a cache with ``kv_slots``: k, v (B, Hkv, Q, Dh) into the stores (B, Hkv, S, Dh) at
    ``slots`` (Q,) (what the fused RoPE kernel does on the GPU); returns the stores."""
    K, V = stores
    K.index_copy_(2, slots, k)
    V.index_copy_(2, slots, v)
    return K, V


class PositionStoreCache(Cache):
    """A cache whose K/V storage has one slot per canvas position plus the trash slot of ``models/rows.py``
    (``self.k``, ``self.v``: (n_layers, B, Hkv, T + 1, Dh); ``self.length`` = T): the rows a step runs write their
    K/V at their own positions (dummies: the trash slot) and attend to every position's. dLLM-Cache and d2Cache."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    length: int = 0

    def update(self, layer_idx: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, M, Dh) of the rows run -> their slots ``input_pos`` (B, M); returns the cached K/V of
        every position (B, Hkv, T, Dh)."""
        T = self.length
        scatter_heads_(self.k[layer_idx], input_pos, k)
        scatter_heads_(self.v[layer_idx], input_pos, v)
        return self.k[layer_idx, :, :, :T], self.v[layer_idx, :, :, :T]
