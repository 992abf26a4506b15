"""d2Cache: dual adaptive caching (Jiang et al., "d2Cache: Accelerating Diffusion-Based LLMs via Dual Adaptive
Caching", arXiv:2509.23094; Kamichanw/d2Cache ``src/cache/d2cache.py``).

The first forward pass runs the whole canvas and stores every layer's K/V. Afterwards each step runs only a small
set of positions per batch row, chosen after the previous step in two stages:

1. masked positions: the ``current_k`` masked positions of highest *certainty density* score
   ``kappa_j * D_j`` (``kappa`` = the position's latest confidence, ``D`` = a Gaussian-smoothed "how decoded is
   the neighbourhood", width ``sigma``), searched from the block start to the end of the block that holds the
   ``current_k``-th masked position, positions of the current block first; Dream runs the row left of each
   (it predicts the column), and every position committed (or re-masked) in the step, whose K/V changed;
2. the other positions (prompt included): attention rollout (Abnar & Zuidema, arXiv:2005.00928) of this step's
   queried rows gives each position an importance (column sums of the rolled-out attention); the most important
   ones are added until their share of the total reaches ``rollout_p`` (at least one);
3. ``inflate_w > 0``: gaps of at most ``inflate_w`` between selected positions are filled.

Only those rows run through the model's layers (``model(..., input_pos=slots)``, the rows' own positions as key
slots); their fresh K/V overwrite the cache and they attend to all cached K/V. The rollout reads each layer's
queries and keys through the ``observe_attention`` hook. Columns whose logits were not recomputed are marked in
the returned ``StepLogits.fresh`` (no strategy commits them).

Attention probabilities without eager attention: outputs come from the fused SDPA kernel as for every other cache;
the rollout's head-averaged probabilities are computed separately for the queried rows only, in float32, from their
queries and the cached keys: per layer one extra ``(M x T)`` score matmul per head and a softmax, i.e. about
``2 M T d_model`` FLOPs and ``B H M T`` floats (M queried rows, T canvas length; a full step, M = T, is done in
chunks of 256 queries), plus the rollout update ``2 M^2 T``. At M = 64, T = 1024 that is under 2% of the
layer's matmul work.

Differences from the released code, on purpose (spec §10.4, §14.9):

- ``kappa`` is refreshed with the newest confidence of every masked position that was queried (the release never
  updates it after the first step); ``kappa`` is the maximum probability of the fresh logits (the release takes
  the strategy's confidence, which is the same at temperature 0 with the default confidence rule);
- the search window rounds up to whole blocks of ``block_length`` (the release divides by the number of block
  positions still masked at the step's start);
- batch rows are independent: a row with fewer queried positions than the batch's largest set runs placeholder
  rows that change nothing (the release tops it up with real recomputations), the in-block bonus uses the row's own
  maximum (the release: the batch maximum), rows that do not decode in a step keep their state, padding is never
  queried nor counted in the rollout, and the rollout is computed in float32 (release: bf16);
- Dream's last prompt row is queried when the first generation column is selected *in addition* to the rollout
  picks (the release overwrites that flag);
- ``refresh_interval`` (ours, off by default, as the paper): run the whole canvas again every that many steps of a
  row. ``refresh_interval=1`` is the exact computation.

``sigma`` here is the width of the density that picks which masked rows to *recompute*. The certainty-prior
strategy parameter of the same name (spec §4) multiplies the *commit* scores by the same density; with
``cache=d2cache`` a ``sigma`` given in ``--model_args`` sets both (the paper's configuration: certainty-prior
decoding with one block of ``gen_length``, ``sigma=10``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.caches.base import PositionStoreCache
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.models.rows import gather_rope, store_index
from lmeval_dllm.samplers.base import top_k_mask
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits, StepOutput

QUERY_BUCKET = 16  # rows run per step are rounded up to a multiple of this: few shapes, few CUDA graphs
PROBS_CHUNK = 256  # queries per chunk when computing attention probabilities and LM-head confidences


def density_kernel(G: int, sigma: float, device=None) -> torch.Tensor:
    """(3G, G) float32 matrix W with ``D = u_ext @ W`` the certainty density of spec §0.5.

    ``u_ext`` (B, 3G) = [1 (G columns: the prompt side counts as decoded); u (B, G); u[:, -1] repeated G times], the
    Gaussian weight of extended position m (m = -G .. 2G-1) on j is exp(-(j - m)^2 / (2 sigma^2)), and the
    constant normaliser Z = sum_{d=-3G}^{3G-1} exp(-d^2 / (2 sigma^2)).
    """
    m = torch.arange(-G, 2 * G, device=device, dtype=torch.float64)[:, None]
    j = torch.arange(G, device=device, dtype=torch.float64)[None, :]
    d = torch.arange(-3 * G, 3 * G, device=device, dtype=torch.float64)
    z = torch.exp(-(d ** 2) / (2 * sigma ** 2)).sum()
    return (torch.exp(-((j - m) ** 2) / (2 * sigma ** 2)) / z).float()


def certainty_density(decoded: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """decoded (B, G) bool -> density (B, G) float32 (spec §0.5), with ``kernel`` from :func:`density_kernel`."""
    u = decoded.float()
    ext = torch.cat([torch.ones_like(u), u, u[:, -1:].expand_as(u)], dim=1)  # (B, 3G)
    return ext @ kernel


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention probabilities averaged over heads, in float32.

    q (B, Hq, M, Dh), k (B, Hkv, T, Dh) (grouped-query: Hq = r * Hkv), key_mask (B, T) bool or None
    -> (B, M, T).
    """
    B, Hq, M, Dh = q.shape
    Hkv = k.shape[1]
    kf = k.float()[:, :, None].transpose(-1, -2)  # (B, Hkv, 1, Dh, T)
    out = []
    for s in range(0, M, PROBS_CHUNK):
        qc = q[:, :, s:s + PROBS_CHUNK].float().view(B, Hkv, Hq // Hkv, -1, Dh)
        scores = (qc @ kf) / math.sqrt(Dh)  # (B, Hkv, r, m, T)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
        out.append(scores.softmax(-1).mean(dim=(1, 2)))
    return torch.cat(out, dim=1)


class D2Cache(PositionStoreCache):
    """Per-step query selection by certainty density (masked rows) and attention rollout (the rest).

    Args:
        rollout_p: share of the rollout importance (of positions not yet selected) to recompute, in [0, 1].
            Default 0.1 (release).
        current_k: masked positions recomputed per step (>= 1). Default 32 (release).
        sigma: width of the certainty density used to pick them (> 0). Default 10 (release).
        inflate_w: fill gaps of at most this many positions between selected ones (>= 0). Default 0, the
            released configuration (``configs/cache/d2cache.yaml``; the authors add ``inflate_w=4`` with
            semi-autoregressive blocks).
        refresh_interval: run the whole canvas again every ``refresh_interval`` steps of a row (ours). None
            (default): only the first step.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage: K, V `(n_layers, B, Hkv, T + 1, Dh)` (slot T is the trash slot of ``models/rows.py``), allocated
    when the batch shape changes; per-row state (B, T) / (B, G).
    """

    name = "d2cache"
    block_causal = (
        "its row selection reads full-attention scores (attention rollout over every column), which a "
        "block-causal model does not have"
    )
    lacks = {
        "extra_rows": "d2cache chooses its own query rows among canvas positions and cannot add rows outside it",
        "resize": "d2cache's K/V, confidence and importance records are stored by canvas position",
    }

    needs_attention = True  # the rollout reads every layer's attention probabilities

    def __init__(self, *, rollout_p: float = 0.1, current_k: int = 32, sigma: float = 10.0, inflate_w: int = 0,
                 refresh_interval: Optional[int] = None, cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
        if not 0.0 <= rollout_p <= 1.0:
            raise ValueError(f"rollout_p must be in [0, 1], got {rollout_p!r}")
        if current_k < 1:
            raise ValueError(f"current_k must be an integer >= 1, got {current_k}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if inflate_w < 0:
            raise ValueError(f"inflate_w must be an integer >= 0, got {inflate_w}")
        if refresh_interval is not None and refresh_interval < 1:
            raise ValueError(f"refresh_interval must be an integer >= 1 (or None), got {refresh_interval}")
        self.rollout_p, self.current_k, self.sigma, self.inflate_w = rollout_p, current_k, sigma, inflate_w
        self.refresh_interval = refresh_interval
        self.k = self.v = None

    # -- per call -----------------------------------------------------------------------------------------------

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        a = model.args
        B, T = state.x.shape
        P, G, device = state.prompt_len, T - state.prompt_len, model.device
        shape = (a.n_layers, B, a.n_kv_heads, T + 1, a.head_dim)
        if self.k is None or tuple(self.k.shape) != shape or self.k.dtype != model.dtype or self.k.device != device:
            self.k = self.v = None
            self.k = torch.zeros(shape, dtype=model.dtype, device=device)
            self.v = torch.zeros_like(self.k)
        self.graphs.reset()  # the per-call tensors below get new addresses
        self.prompt_len, self.length, self.shift = P, T, model.logit_shift
        self.real_keys = state.attention_mask if state.attention_mask is not None else \
            torch.ones(B, T, dtype=torch.bool, device=device)
        self.queries = self.real_keys.clone()  # (B, T) bool: rows to run next step (the first: all real rows)
        self.kappa = torch.zeros(B, G + 1, device=device)  # confidence record; column G is a trash slot
        self.importance = torch.zeros(B, T, device=device)  # rollout importance of this step
        self.was_masked = torch.zeros(B, G, dtype=torch.bool, device=device)  # masks when the step's rows ran
        self.passes_dev = torch.zeros(B, dtype=torch.long, device=device)  # per row: passes it decoded in
        self.cos, self.sin = model.rope(state.position_ids)  # (B, 1, T, Dh)
        self.kernel = density_kernel(G, self.sigma, device)
        self.mask_token_id = state.mask_token_id
        self._step: Optional[dict] = None  # what the layer hooks of one forward share

    def _full(self, active: torch.Tensor) -> torch.Tensor:
        """(B,) bool: active rows that run the whole canvas this step (their first, or a refresh)."""
        n = self.passes_dev
        full = n == 0
        if self.refresh_interval is not None:
            full = full | (n % self.refresh_interval == 0)
        return active & full

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        if extra is not None or state.x.shape[1] != self.length:
            raise RuntimeError("d2cache runs canvas rows of a fixed length only (check_compatible)")
        B, T = state.x.shape
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        # The step's shape is the largest query set: the step's one host read.
        full = self._full(active)
        counts = torch.where(full, self.real_keys.sum(-1), torch.where(active, self.queries.sum(-1), 0))
        most = int(counts.max())
        M = min(T, -(-most // QUERY_BUCKET) * QUERY_BUCKET)
        mask = () if state.attention_mask is None else (state.attention_mask,)
        key = (B, T, M, targets.start, targets.stop, len(mask))
        logits, fresh = self.graphs.run(key, lambda x, act, *m: self._forward(model, x, act, m, M, targets),
                                        state.x, active, *mask)
        return StepLogits(logits, fresh)

    def _forward(self, model, x, active, mask, M: int, targets: slice):
        """x (B, T), active (B,) -> logits (B, len(targets), V), fresh (B, T). Runs M rows per batch row."""
        B, T = x.shape
        P = self.prompt_len
        key_mask = mask[0] if mask else None
        run = torch.where(self._full(active)[:, None], self.real_keys, self.queries) & active[:, None]  # (B, T)
        index = torch.sort(run.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :M]  # (B, M)
        real = run.gather(1, index)  # (B, M): the first |run| of each row, then placeholders
        self.was_masked.copy_(x[:, P:] == self.mask_token_id)
        onehot = torch.zeros(B, M, T + 1, device=x.device).scatter_(2, index[..., None], 1.0)[..., :T]
        # rollout (B, M, T): rows of the rolled-out attention for the queried positions, grown by each layer
        self._step = dict(index=index, real=real, onehot=onehot, key_mask=key_mask, rollout=onehot)
        rope = (gather_rope(self.cos, index), gather_rope(self.sin, index))
        h = model(x.gather(1, index), None, key_mask, self, None, input_pos=store_index(index, real, T), rope=rope,
                  hidden=True)  # (B, M, D)
        rollout, self._step = self._step["rollout"], None
        # Importance: column sums of R; unqueried rows are identity rows (1 in their own column).
        self.importance.copy_((~run).float() + (rollout * real[..., None]).sum(1))
        self.passes_dev += active.long()
        return self._logits(model, h, index, real, targets)

    # -- the model's layer hooks ------------------------------------------------------------------------------

    def observe_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """One rollout layer: R <- rownorm(A + I) R over the queried rows; other rows are identity rows."""
        st = self._step
        a = head_mean_probs(q, k, st["key_mask"]) + st["onehot"]
        a = a / a.sum(-1, keepdim=True)
        st["rollout"] = self._rollout_step(a, st["index"], st["real"], st["rollout"])

    @staticmethod
    def _rollout_step(a: torch.Tensor, index: torch.Tensor, real: torch.Tensor, rollout: torch.Tensor):
        """One rollout layer restricted to the queried rows.

        a (B, M, T): row-normalised (attention + identity) of the queried rows; rollout (B, M, T): their rows of
        the rollout so far. Rows of unqueried positions are identity rows, so a weight on an unqueried column
        stays in that column, and a weight on a queried column picks up that row's rollout. -> (B, M, T).
        """
        B, M, T = a.shape
        onto_queried = a.gather(2, index[:, None, :].expand(B, M, M)) * real[:, None, :]  # (B, M, M)
        slots = store_index(index, real, T)[:, None, :].expand(B, M, M)
        through = torch.cat([a, a.new_zeros(B, M, 1)], -1).scatter(2, slots, 0.0)[..., :T]
        return through + onto_queried @ rollout

    def _logits(self, model, h, index, real, targets: slice):
        """LM head over the queried rows: confidence records, and the logits of the ``targets`` columns."""
        B, M, _ = h.shape
        P, T, G, shift = self.prompt_len, self.length, self.length - self.prompt_len, self.shift
        L = targets.stop - targets.start
        col = index + shift  # (B, M): the column each row predicts
        in_gen = real & (col >= P) & (col < T)
        masked_col = self.was_masked.gather(1, (col - P).clamp(0, G - 1)) & in_gen
        kappa_slot = torch.where(masked_col, col - P, G)
        in_targets = in_gen & (col >= targets.start) & (col < targets.stop)
        target_slot = torch.where(in_targets, col - targets.start, L)
        out = None
        for s in range(0, M, PROBS_CHUNK):
            logits = model.head(h[:, s:s + PROBS_CHUNK])  # (B, m, V)
            if out is None:
                out = logits.new_zeros(B, L + 1, logits.shape[-1])
            conf = logits.float().softmax(-1).amax(-1)  # (B, m)
            self.kappa.scatter_(1, kappa_slot[:, s:s + PROBS_CHUNK], conf)
            out.scatter_(1, target_slot[:, s:s + PROBS_CHUNK, None].expand(-1, -1, logits.shape[-1]), logits)
        fresh = torch.zeros(B, T + 1, dtype=torch.bool, device=h.device)
        fresh.scatter_(1, torch.where(in_gen, col, T), True)
        return out[:, :L], fresh[:, :T]

    # -- selection for the next step ----------------------------------------------------------------------------

    def end_step(self, state: DecodeState, out: StepOutput) -> None:
        B, T = state.x.shape
        P, G, shift, device = self.prompt_len, T - self.prompt_len, self.shift, state.x.device
        masked = state.x[:, P:] == self.mask_token_id  # (B, G) still masked after this step
        changed = self.was_masked ^ masked  # committed (or re-masked): their K/V changed
        block_len = state.block.stop - state.block.start
        block_start = state.block.start - P
        col = torch.arange(G, device=device)
        # Search window: block start .. end of the block holding the current_k-th masked position.
        enough = masked.long().cumsum(-1) >= self.current_k
        kth = torch.where(enough.any(-1), enough.int().argmax(-1), G - 1)
        end = torch.clamp((kth // block_len + 1) * block_len - 1, min=block_start + block_len - 1)  # (B,)
        window = (col >= block_start) & (col[None, :] <= end[:, None])  # always holds the current block
        score = self.kappa[:, :G] * certainty_density(~masked, self.kernel)
        in_block = (col >= block_start) & (col < block_start + block_len)
        score = score + in_block * score.amax(-1, keepdim=True)  # masks of the current block come first
        k = torch.full((B,), min(self.current_k, G), device=device)
        selected = top_k_mask(score, window & masked, k)
        queries = torch.zeros(B, T + 1, dtype=torch.bool, device=device)
        queries[:, P - shift:T - shift] = selected  # Dream: the row left of the column predicts it
        queries[:, P:T] |= changed
        queries = queries[:, :T] & self.real_keys
        queries |= self._rollout_pick(queries)
        if self.inflate_w > 0:
            queries |= self._inflate(queries) & self.real_keys
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=device)
        self.queries.copy_(torch.where(active[:, None], queries, self.queries))  # in place: graphs read it

    def _rollout_pick(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: unselected real positions with the largest importance, until their share of the
        candidates' total importance reaches ``rollout_p`` (inclusive), and at least the top one."""
        candidates = ~queries & self.real_keys
        weight = torch.where(candidates, self.importance, 0.0)
        share = weight / (weight.sum(-1, keepdim=True) + 1e-9)
        ordered, order = torch.sort(share, dim=-1, descending=True, stable=True)
        keep = ordered.cumsum(-1) <= self.rollout_p
        keep[:, 0] = True
        keep &= candidates.gather(1, order)
        return torch.zeros_like(queries).scatter_(1, order, keep)

    def _inflate(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: positions between two selected ones at most ``inflate_w`` apart."""
        T = queries.shape[1]
        pos = torch.arange(T, device=queries.device).expand_as(queries)
        nxt = torch.where(queries, pos, T).flip(-1).cummin(-1).values.flip(-1)
        prv = torch.where(queries, pos, -1).cummax(-1).values
        return (nxt - prv <= self.inflate_w) & (prv >= 0) & (nxt < T)
