"""Elastic-Cache: attention-aware, depth-aware cache refresh (Nguyen-Tri, Ranjan, Shen, "Attention Is All You
Need for KV Cache in Diffusion LLMs", arXiv:2510.14973; VILA-Lab/Elastic-Cache ``llada/generate.py::
generate_with_elastic_cache`` with its ``llada/model/modeling_llada.py::LLaDABlock.attention``, and
``dream/model/generation_utils_elastic.py::_sample`` with ``modeling_dream.py::DreamSdpaAttention``).

The release decodes from a sliding window: each step looks at the first ``window_length`` masked positions
(after the first decoded end-of-sequence token, the masks right of it are dropped), and every layer keeps the
K/V, the queries and the input hidden states of every position. Its first forward pass runs the whole canvas;
every later step runs only

- the *tracked* positions: per layer, the ``track_num`` positions that are not masked and receive the most
  attention from the window's rows (summed over heads and rows), chosen at the previous step;
- the positions committed at the previous step (their token changed);
- the window's rows (Dream: the row left of each window column, which predicts it); with ``block_caching=False``
  every masked position's row, not only the window's ("block caching" of the distant masks is the default);

against the cached K/V of all the others. In each layer the tracked rows' attention before and after this step's
K/V are written is compared: the cosine similarity over heads, averaged over the tracked rows and the keys. At the
first layer where it falls below ``gamma`` the attention has drifted, and every layer after it is recomputed for
the whole canvas (the depth-aware refresh), starting from the stored inputs of that layer (with the fresh rows of
this step written in). The layers up to it keep their cache.

How it runs here, with static shapes and one host read per step:

1. The rows of this step (tracked, committed, window: a fixed number of slots each, ``n_layers * track_num``,
   ``window_length`` and ``window_length`` (or the generation length without block caching), empty slots are
   placeholders that write to the trash slot of ``models/rows.py``) run through *every* layer: the hooks store
   their K/V (``update``), queries (``observe_attention``) and input hidden states (``layer_input``), pick each
   layer's tracked positions, and compute the drift test of every layer on the device.
2. The first drifting layer ``l`` of each batch row gives the layer its refresh starts at (``l + 1``; none: the
   number of layers); the smallest over the batch is read to the host: the step's one sync, because it sets the
   shape of the second pass (which layers run the whole canvas).
3. If some row drifted, the whole canvas runs from that layer on: a row starts at its own first layer from the
   stored inputs (``layer_input`` substitutes them), and the K/V, queries, inputs and tracked positions of a row
   are replaced only from its own start on, so a row of a batch computes what it computes alone. The layers below
   the smallest start run no rows. The refreshed rows take the logits of this pass.

Step 1 runs the layers after the first drifting one on a handful of rows against stale K/V, which the release does
not compute; their results are discarded (the K/V, queries and inputs they stored are overwritten in step 3). The
logits returned are those of the window's columns; only they are ``fresh``, so a strategy decodes from the window
(with one block of ``gen_length`` and vanilla's ``threshold``, the release's decoding).

Deviations from the released code (docs/caches.md):

- The drift test and the choice of tracked positions use attention probabilities computed in float32 from the
  queries and the cached keys (the release: its own bf16 attention weights, which also produce its attention
  output; here the output comes from the model's fused attention, as for every cache).
- Batches (the release decodes one prompt): per-row state throughout; padded keys are masked and left out of the
  similarity average and never tracked; a row that does not decode in a step keeps its state.
- The masks right of the first committed stop token (EOS or end-of-turn, ``state.stop_token_ids``) leave the
  window; the release's test is ``eos_id`` only.
- ``refresh_interval`` (ours; off by default): every ``refresh_interval`` forward passes of a row it runs the whole
  canvas. ``refresh_interval=1`` is the exact computation over the release's window.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lmeval_dllm.caches.base import Cache
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.models.kernels import kernel
from lmeval_dllm.models.rows import RowSubset, gather_rope, gather_rows, scatter_heads_, scatter_rows_, store_index
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits, StepOutput


def first_true(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, T) bool -> (positions (B, n) long, real (B, n) bool): each row's first ``n`` True positions in
    ascending order, then placeholder positions (real = False) where the row has fewer."""
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :n]
    return order, mask.gather(1, order)


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of queries q (B, Hq, N, Dh) over keys k (B, Hkv, T, Dh) (grouped-query: query head h reads
    key head h // (Hq / Hkv)), padded keys (key_mask (B, T) False) excluded -> (B, Hq, N, T) float32."""
    B, Hq, N, Dh = q.shape
    Hkv = k.shape[1]
    scores = q.float().view(B, Hkv, Hq // Hkv, N, Dh) @ k.float()[:, :, None].transpose(-1, -2)  # (B, Hkv, r, N, T)
    scores = (scores / math.sqrt(Dh)).masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    return scores.softmax(-1).view(B, Hq, N, -1)


def attention_similarity(past: torch.Tensor, now: torch.Tensor, rows: torch.Tensor,
                         key_mask: torch.Tensor) -> torch.Tensor:
    """The drift test's statistic: past, now (B, H, N, T) attention of N tracked rows -> (B,) the cosine similarity
    over heads (the release's ``F.cosine_similarity(..., dim=1)``), averaged over the real rows (rows (B, N)) and
    the real keys (key_mask (B, T))."""
    cos = F.cosine_similarity(past, now, dim=1)  # (B, N, T)
    weight = (rows[:, :, None] & key_mask[:, None, :]).float()
    return (cos * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1.0)


def most_attended(probs: torch.Tensor, rows: torch.Tensor, masked: torch.Tensor, key_mask: torch.Tensor,
                  k: int) -> torch.Tensor:
    """The tracked positions of one layer: probs (B, H, N, T) of the window rows (real: rows (B, N)) -> (B, k) the
    keys with the largest attention summed over heads and rows; masked positions (masked (B, T)) count 0 (the
    release zeroes them), padded keys are never chosen."""
    score = (probs * rows[:, None, :, None]).sum((1, 2))  # (B, T)
    score = score.masked_fill(masked, 0.0).masked_fill(~key_mask, -1.0)
    return score.topk(k, dim=-1).indices


def gather_heads(store: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """store (B, H, S, Dh), index (B, N) -> (B, H, N, Dh)."""
    return store.gather(2, index[:, None, :, None].expand(-1, store.shape[1], -1, store.shape[-1]))


# The three stages below are each layer's statistics, one attention product each (the tracked rows and the window
# rows of a cached step share one). On CUDA each runs as one compiled function (``models/kernels.py``: the matmul,
# then a few fused kernels for the mask, softmax and reductions instead of about fifteen small ones): the cached step
# at LLaDA-8B, batch 1, went from 14.49 to 11.88 ms on an H100 (docs/performance.md). On the CPU they run as written.

def past_attention(q_store: torch.Tensor, tcols: torch.Tensor, k: torch.Tensor,
                   key_mask: torch.Tensor) -> torch.Tensor:
    """The drift test's "before": the stored queries q_store (B, Hq, T + 1, Dh) of the tracked positions tcols
    (B, NT) over the keys as they were, k (B, Hkv, T, Dh) -> (B, Hq, NT, T) float32."""
    return attention_probs(gather_heads(q_store, tcols), k, key_mask)


def drift_and_track(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, past: torch.Tensor,
                    treal: torch.Tensor, mreal: torch.Tensor, masked: torch.Tensor, n_track: int, rows_from: int,
                    keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cached step's layer statistics from one attention product over every row run, q (B, Hq, M, Dh) (the
    tracked rows first, the masked rows from ``rows_from`` on), against the fresh keys k (B, Hkv, T, Dh):
    -> (sim (B,) the drift statistic against ``past`` (B, Hq, n_track, T), track (B, keep) this layer's new
    tracked positions)."""
    probs = attention_probs(q, k, key_mask)  # (B, Hq, M, T)
    sim = attention_similarity(past, probs[:, :, :n_track], treal, key_mask)
    return sim, most_attended(probs[:, :, rows_from:], mreal, masked, key_mask, keep)


def window_track(q: torch.Tensor, mrows: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor,
                 mreal: torch.Tensor, masked: torch.Tensor, keep: int) -> torch.Tensor:
    """A refresh's tracked positions: the masked rows mrows (B, NM) of the canvas queries q (B, Hq, T, Dh)
    against k (B, Hkv, T, Dh) -> (B, keep)."""
    return most_attended(attention_probs(gather_heads(q, mrows), k, key_mask), mreal, masked, key_mask, keep)


for _stage in (past_attention, drift_and_track, window_track):
    _stage.row_dims = lambda x: tuple(range(x.dim()))  # batch, rows and the canvas length change between calls


class ElasticCache(Cache):
    """Sliding-window decoding with attention-drift-triggered, depth-aware refresh of the cached K/V.

    Args:
        window_length: masked positions the strategy decodes from at each step (the first ones, >= 1). Default 16
            (``generate_with_elastic_cache``; the Dream scripts use 32).
        gamma: refresh from the layer after the first one whose tracked attention's cosine similarity falls below
            it, in [0, 1]. Default 0.9 (release).
        track_num: most-attended positions tracked per layer (>= 1). Default 1 (release).
        block_caching: cache the masked positions outside the window (release default True); False runs every
            masked row at every step.
        refresh_interval: run the whole canvas every ``refresh_interval`` forward passes of a row (ours). None
            (default): only the first pass, as the release.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage per layer: K, V `(B, Hkv, T + 1, Dh)`, queries `(B, Hq, T + 1, Dh)`, input hidden states
    `(B, T + 1, D)` (slot T is the trash slot) and the tracked positions `(B, track_num)`; LLaDA-8B at T = 1024:
    about 1 GiB per batch row. Allocated when the batch shape changes.
    """

    name = "elastic"
    block_causal = (
        "its drift test and window refresh assume full (bidirectional) attention, where every column's K/V can go "
        "stale; a block-diffusion model's finished blocks are exact in cache=block"
    )
    lacks = {
        "extra_rows": "elastic chooses its own query rows among canvas positions and cannot add rows outside it",
        "resize": "elastic's K/V, queries, hidden states and tracked positions are stored by canvas position",
        "decoded_logits": "elastic returns logits for its window of masks only, so a decoded token never gets the "
                          "fresh prediction an edit needs",
    }
    needs_attention = True  # the drift test and the tracked positions read every layer's attention

    def __init__(self, *, window_length: int = 16, gamma: float = 0.9, track_num: int = 1, block_caching: bool = True,
                 refresh_interval: Optional[int] = None, cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
        if window_length < 1:
            raise ValueError(f"window_length must be an integer >= 1, got {window_length}")
        if not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1] (a cosine similarity), got {gamma!r}")
        if track_num < 1:
            raise ValueError(f"track_num must be an integer >= 1, got {track_num}")
        if refresh_interval is not None and refresh_interval < 1:
            raise ValueError(f"refresh_interval must be an integer >= 1 (or None), got {refresh_interval}")
        self.window_length, self.gamma, self.track_num = window_length, gamma, track_num
        self.block_caching, self.refresh_interval = block_caching, refresh_interval
        self.k = self.v = self.q = self.h = None
        self._step: Optional[dict] = None  # what the layer hooks of one forward share

    # -- per call -----------------------------------------------------------------------------------------------

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        a = model.args
        B, T = state.x.shape
        P, G, device, dtype = state.prompt_len, T - state.prompt_len, model.device, model.dtype
        kv_shape = (a.n_layers, B, a.n_kv_heads, T + 1, a.head_dim)
        if self.k is None or tuple(self.k.shape) != kv_shape or self.k.dtype != dtype or self.k.device != device:
            self.k = self.v = self.q = self.h = None
            self.k = torch.zeros(kv_shape, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
            self.q = torch.zeros(a.n_layers, B, a.n_heads, T + 1, a.head_dim, dtype=dtype, device=device)
            self.h = torch.zeros(a.n_layers, B, T + 1, a.dim, dtype=dtype, device=device)
        self.graphs.reset()  # the per-call tensors below get new addresses
        self.n_layers, self.length, self.prompt_len, self.shift = a.n_layers, T, P, model.logit_shift
        self.fuse = model.fuse  # the layer statistics as compiled kernels on CUDA (as the model's own stages)
        self.mask_token_id = state.mask_token_id
        self.stop_token_ids = state.stop_token_ids
        # slots per step: tracked, committed, masked rows (the first n_window of which are the window)
        self.n_window = min(self.window_length, G)
        self.n_masks = self.n_window if self.block_caching else G
        self.n_track = min(a.n_layers * self.track_num, T)
        self.real_keys = state.attention_mask if state.attention_mask is not None else \
            torch.ones(B, T, dtype=torch.bool, device=device)
        self.cos, self.sin = model.rope(state.position_ids)  # (B, 1, T, Dh)
        self.track = torch.zeros(a.n_layers, B, min(self.track_num, T), dtype=torch.long, device=device)
        self.limit = torch.full((B,), T, dtype=torch.long, device=device)  # first committed stop token (T: none)
        self.pending = torch.zeros(B, T, dtype=torch.bool, device=device)  # committed since the row's last pass
        self.was_masked = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.passes = torch.zeros(B, dtype=torch.long, device=device)  # forward passes each row decoded in
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.columns = torch.arange(T, device=device)
        self.no_rows = RowSubset(torch.zeros(B, 0, dtype=torch.long, device=device),
                                 torch.zeros(B, 0, dtype=torch.bool, device=device), T)
        self._first = True
        # this call's step counts, read by benchmarks: steps after the first that refreshed (from which layer
        # on: the sum of the layers rerun), and all steps after the first (host ints; no extra sync)
        self.refresh_steps = self.refreshed_layers = self.cached_steps = 0

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        if extra is not None or state.x.shape[1] != self.length:
            raise RuntimeError("elastic runs canvas rows of a fixed length only (check_compatible)")
        B, T, L = *state.x.shape, self.n_layers
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        mask = () if state.attention_mask is None else (state.attention_mask,)
        L_span = targets.stop - targets.start
        # the span's first column as a tensor: one graph serves every block of a length
        first_col = self.columns[targets.start]  # a view: no host-to-device copy
        self.was_masked.copy_(state.x == self.mask_token_id)
        if self._first:  # the call's first pass: every layer, the whole canvas
            start = torch.where(active, 0, L)
            logits, fresh = self.graphs.run(("full", 0, B, T, L_span, len(mask)),
                                            lambda x, act, st, c, *m: self._full(model, x, act, st, m, 0, c, L_span),
                                            state.x, active, start, first_col, *mask)
            self._first = False
        else:
            logits, fresh, start = self.graphs.run(("rows", B, T, L_span, len(mask)),
                                                   lambda x, act, c, *m: self._rows(model, x, act, m, c, L_span),
                                                   state.x, active, first_col, *mask)
            first = int(start.min())  # the step's one host read: the layer the refresh starts at (L: none)
            self.cached_steps += 1
            if first < L:
                self.refresh_steps += 1
                self.refreshed_layers += L - first
                # The refresh graph may have been captured before this one in the shared pool (the call's first
                # pass is a full one): its replay may reuse the memory of this graph's outputs, so keep copies.
                logits, fresh, start = logits.clone(), fresh.clone(), start.clone()
                full, _ = self.graphs.run(("full", first, B, T, L_span, len(mask)),
                                          lambda x, act, st, c, *m: self._full(model, x, act, st, m, first, c, L_span),
                                          state.x, active, start, first_col, *mask)
                logits = torch.where((start < L)[:, None, None], full, logits)
        self.passes += active.long()
        return StepLogits(logits, fresh)

    def _plan(self, x: torch.Tensor, active: torch.Tensor) -> dict:
        """This step's positions: the masks still decodable (B, T), the masked rows run (first the window's)."""
        T, P = self.length, self.prompt_len
        col = torch.arange(T, device=x.device)
        masked = (x == self.mask_token_id) & (col >= P) & (col[None, :] <= self.limit[:, None])  # (B, T)
        mcols, mreal = first_true(masked, self.n_masks)  # (B, NM) ascending: the window first
        mrows = (mcols - self.shift).clamp(min=0)  # Dream: the row left of the column predicts it
        return dict(masked=masked, mrows=mrows, mreal=mreal & active[:, None], wcols=mcols[:, :self.n_window],
                    wreal=mreal[:, :self.n_window], active=active)

    def _rows(self, model, x, active, mask, first_col: torch.Tensor, span: int):
        """Step 1 (see the module docstring): tracked, committed and window rows through every layer.
        x (B, T), active (B,) -> logits (B, span, V) of columns first_col.., fresh (B, T), start (B,) long."""
        B, T, L = *x.shape, self.n_layers
        plan = self._plan(x, active)
        is_track = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        is_track.scatter_(1, self.track.permute(1, 0, 2).reshape(B, -1), True)  # union over layers
        tcols, treal = first_true(is_track, self.n_track)
        dcols, dreal = first_true(self.pending, self.n_window)
        index = torch.cat([tcols, dcols, plan["mrows"]], dim=1)  # (B, M)
        real = torch.cat([treal, dreal, plan["mreal"]], dim=1) & active[:, None]
        slots = store_index(index, real, T)
        key_mask = mask[0] if mask else self.real_keys
        NT, ND = tcols.shape[1], dcols.shape[1]
        self._step = dict(phase=1, slots=slots, tcols=tcols, treal=treal & active[:, None], key_mask=key_mask,
                          masked=plan["masked"], mreal=plan["mreal"], active=active, rows_from=NT + ND,
                          n_track=NT, sims=[])
        rope = (gather_rope(self.cos, index), gather_rope(self.sin, index))
        h = model(x.gather(1, index), None, mask[0] if mask else None, self, None, input_pos=slots, rope=rope,
                  hidden=True)  # (B, M, D)
        sims = torch.stack(self._step["sims"])  # (L, B)
        self._step = None
        logits, fresh = self._window_logits(model, h[:, NT + ND:NT + ND + self.n_window], plan, first_col, span)
        drifted = sims < self.gamma
        start = torch.where(drifted.any(0), drifted.int().argmax(0) + 1, L)  # refresh after the first drift
        if self.refresh_interval is not None:
            start = torch.where(self.passes % self.refresh_interval == 0, 0, start)
        return logits, fresh, torch.where(active, start, L)

    def _full(self, model, x, active, start, mask, first: int, first_col: torch.Tensor, span: int):
        """Step 3: the whole canvas from layer ``first`` on; row b's caches are replaced from layer start[b] on.
        -> logits (B, span, V) of the window, fresh (B, T)."""
        plan = self._plan(x, active)
        key_mask = mask[0] if mask else self.real_keys
        self._step = dict(phase=2, start=start, first=first, key_mask=key_mask, masked=plan["masked"],
                          mrows=plan["mrows"], mreal=plan["mreal"])
        h = model(x, None, mask[0] if mask else None, self, None, rope=(self.cos, self.sin), hidden=True)  # (B, T, D)
        self._step = None
        return self._window_logits(model, gather_rows(h, plan["mrows"][:, :self.n_window]), plan, first_col, span)

    def _window_logits(self, model, h: torch.Tensor, plan: dict, first_col: torch.Tensor, L: int):
        """LM head on the window's rows h (B, W, D) -> logits of the L columns from ``first_col`` (zeros outside
        the window) and fresh (B, T): the window's columns."""
        B, T = h.shape[0], self.length
        logits = model.head(h)  # (B, W, V)
        wcols, wreal = plan["wcols"], plan["wreal"]
        inside = wreal & (wcols >= first_col) & (wcols < first_col + L)
        slot = torch.where(inside, wcols - first_col, L)
        out = logits.new_zeros(B, L + 1, logits.shape[-1])
        out.scatter_(1, slot[..., None].expand(-1, -1, logits.shape[-1]), logits)
        fresh = torch.zeros(B, T + 1, dtype=torch.bool, device=h.device)
        fresh.scatter_(1, torch.where(wreal, wcols, T), True)
        return out[:, :L], fresh[:, :T]

    # -- the model's layer hooks ------------------------------------------------------------------------------

    def layer_input(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """Step 1: store the rows' input hidden states. Step 3: a row whose refresh starts at this layer resumes
        from the stored inputs (layer 0's input is the embedding, always exact); from its start on its stored
        inputs are replaced."""
        st, i, T = self._step, layer_idx, self.length
        if st is None:
            return h
        if st["phase"] == 1:
            scatter_rows_(self.h[i], st["slots"], h)
            return h
        if i < st["first"]:
            return h
        start = st["start"]
        if i > 0:
            h = torch.where((start == i)[:, None, None], self.h[i, :, :T], h)
        self.h[i, :, :T] = torch.where((start <= i)[:, None, None], h, self.h[i, :, :T])
        return h

    def layer_rows(self, layer_idx: int, layer, h: torch.Tensor) -> Optional[RowSubset]:
        """Step 3 runs no rows below the smallest start (their caches stay); every row from there on."""
        st = self._step
        if st is not None and st["phase"] == 2 and layer_idx < st["first"]:
            return self.no_rows
        return None

    def reuse(self, layer_idx: int, kind: str, rows: RowSubset, out: Optional[torch.Tensor]) -> torch.Tensor:
        return self.zero  # only for the layers step 3 skips: nothing is added to the (discarded) stream

    def update(self, layer_idx: int, input_pos: Optional[torch.Tensor], k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1: the tracked rows' attention over the keys as they were (the drift test's "before"), then the
        rows' K/V (B, Hkv, M, Dh) are written at their slots. Step 3: a row's K/V (B, Hkv, T, Dh) replace the
        stored ones from its start on. Returns the stored K/V of every position (B, Hkv, T, Dh)."""
        st, i, T = self._step, layer_idx, self.length
        if st["phase"] == 1:
            st["past"] = kernel(past_attention, k, self.fuse)(self.q[i], st["tcols"], self.k[i, :, :, :T],
                                                               st["key_mask"])  # (B, Hq, NT, T)
            scatter_heads_(self.k[i], st["slots"], k)
            scatter_heads_(self.v[i], st["slots"], v)
        else:
            run = (st["start"] <= i)[:, None, None, None]
            self.k[i, :, :, :T] = torch.where(run, k, self.k[i, :, :, :T])
            self.v[i, :, :, :T] = torch.where(run, v, self.v[i, :, :, :T])
        return self.k[i, :, :, :T], self.v[i, :, :, :T]

    def observe_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """q (B, Hq, M, Dh) of the rows run, k (B, Hkv, T, Dh): the drift test (step 1), this layer's tracked
        positions (from the window rows' attention), and the rows' queries stored."""
        st, i, T = self._step, layer_idx, self.length
        key_mask, keep = st["key_mask"], self.track.shape[-1]
        if st["phase"] == 1:
            sim, track = kernel(drift_and_track, q, self.fuse)(q, k, key_mask, st.pop("past"), st["treal"],
                                                                st["mreal"], st["masked"], st["n_track"],
                                                                st["rows_from"], keep)
            st["sims"].append(sim)
            run = st["active"]
            scatter_heads_(self.q[i], st["slots"], q)
        else:
            run = st["start"] <= i
            track = kernel(window_track, q, self.fuse)(q, st["mrows"], k, key_mask, st["mreal"], st["masked"], keep)
            self.q[i, :, :, :T] = torch.where(run[:, None, None, None], q, self.q[i, :, :, :T])
        self.track[i] = torch.where(run[:, None], track, self.track[i])

    # -- after the step -----------------------------------------------------------------------------------------

    def end_step(self, state: DecodeState, out: StepOutput) -> None:
        B, T = state.x.shape
        device = state.x.device
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=device)
        committed = self.was_masked & (state.x != self.mask_token_id)  # (B, T): their K/V are stale
        self.pending.copy_(torch.where(active[:, None], committed, self.pending))
        stops = committed & torch.isin(state.x, self.stop_token_ids)
        col = torch.arange(T, device=device)
        first_stop = torch.where(stops, col, T).amin(-1)
        self.limit.copy_(torch.where(self.limit == T, first_stop, self.limit))  # the release's first decoded EOS
