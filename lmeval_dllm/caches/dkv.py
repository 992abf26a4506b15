"""dKV-Cache: delayed caching of decoded tokens' K/V (Ma et al., "dKV-Cache: The Cache for Diffusion Language
Models", arXiv:2505.15781; horseee/dKV-Cache ``generation_utils/llada_dkv_cache_decode.py`` for LLaDA,
``generation_utils/dream_generation_utils{,_pd}.py`` with ``generation_utils/cache_utils.py`` for Dream).

A token's representation changes most at the step it is decoded, and little afterwards. So a decoded token's K/V
are cached one step *late*: at the step after its decoding its row still runs (with its new token), and from the
step after that its K/V are read from the cache. Masked rows always run. Every ``cache_reloading_step`` steps of a
block the cache is rebuilt by a pass over every row (a refresh); ``cache_reloading_step=1`` is the exact
computation. Concretely, with ``D_i`` the rows whose state counts as decoded after step i, step i runs the rows
outside ``D_(i-2)`` and reads the others' K/V, which were written by the step that last ran them.

Which rows count as decoded (``shift_type``): LLaDA's row p predicts column p, so row p is decoded once token p
is. Dream's row p predicts column p + 1; the release's default ``un`` caches row p once the column it predicts is
decoded (``un_right``: once that column and token p both are). The last row (it predicts nothing) follows the
release: with ``un`` cached once the first column is decoded (the prompt's, so from the first step on), with
``un_right`` as the row before it.

Variants (``variant``, the release's dKV-Cache-Decode / -Prefill / -PD; Dream's ``cache_type`` ``decoded`` /
``prefill`` / ``pd``):

- ``decode``: the delayed cache above;
- ``prefill``: the prompt's rows run once, at the call's first step, and are read from the cache ever after; every
  other row runs at every step (no refresh);
- ``pd``: both: the prompt's K/V are kept from the first step and never recomputed, refreshes rerun every other
  row, and decoded rows are cached with the delay.

dKV-Cache-Greedy (the release's LLaDA ``llada_dkv_cache_greedy.py``) is not offered: it runs only the rows the
*next* step will decode, which it knows because it draws a random decoding order per block before the block
starts (its ``remasking=low_confidence`` raises ``NotImplementedError``); no strategy here publishes its next
commits before the step that computes them.

Each step runs, per batch row, its own set of rows with static shapes (``models/rows.py``): the step's one host
read is the largest set's size (rounded up to a multiple of 16), which sets the shape. The rows write their K/V at
their own positions in a store of every position's K/V and attend to all of it (the release concatenates fresh and
cached keys in a different order; the sum is the same up to rounding).

Differences from the released code (docs/caches.md):

- each row's decoded sets and refresh count are its own (the release's batch needs equal counts per row);
- LLaDA's release forgets the decoded set at each block start, so a block's second step reruns every row (a
  refresh); Dream's release (one block) starts from the prompt's set. Each family follows its release (told apart
  by the model's logit shift: LLaDA and LLaDA-MoE predict column p from row p, Dream from row p - 1); blocks,
  which Dream's release does not have, start like its call (refresh, then the delayed cache);
- the release's third ``shift_type``, ``right`` (row p cached once token p is), is refused: on Dream it leaves a
  masked column p + 1 without the row that predicts it until the next refresh (the release reads ``-inf`` logits
  there and commits garbage).
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.caches.base import PositionStoreCache
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.models.rows import gather_rope, store_index
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits, StepOutput

QUERY_BUCKET = 16  # rows run per step are rounded up to a multiple of this: few shapes, few CUDA graphs
VARIANTS = ("decode", "prefill", "pd")
SHIFT_TYPES = ("un", "un_right")


class DKVCache(PositionStoreCache):
    """dKV-Cache: decoded tokens' K/V cached one step after their decoding, refreshed periodically.

    Args:
        variant: ``decode`` (dKV-Cache-Decode, default), ``prefill`` (the prompt's K/V only) or ``pd`` (both).
        cache_reloading_step: rebuild the cache every that many steps of a block (>= 1; LLaDA's
            ``cache_reloading_step``, Dream's ``cache_steps``). Default 8, the release's LLaDA README setting
            (its Dream README uses 16, its scripts 2 and 4). 1 = the exact computation for ``decode``. Unused by
            ``prefill``.
        shift_type: for Dream, when a row counts as decoded: ``un`` (the column it predicts is decoded; default,
            as every release example) or ``un_right`` (that column and its own token are). No effect on LLaDA.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).

    Storage: K, V `(n_layers, B, Hkv, T + 1, Dh)` (slot T is the trash slot of ``models/rows.py``), allocated
    when the batch shape changes; per-row sets (B, T) bool and counters (B,).
    """

    name = "dkv"
    block_causal = (
        "it delays and reloads the K/V of decoded tokens under full (bidirectional) attention; a block-diffusion "
        "model's finished blocks are exact in cache=block"
    )
    lacks = {
        "extra_rows": "dkv chooses its own query rows among canvas positions and cannot add rows outside it",
        "resize": "dkv's cached sets and K/V are stored by canvas position, which an insertion shifts",
    }

    def __init__(self, *, variant: str = "decode", cache_reloading_step: int = 8, shift_type: str = "un",
                 cuda_graphs: bool = True):
        super().__init__(cuda_graphs=cuda_graphs)
        if variant == "greedy":
            raise ValueError(
                "variant='greedy' (dKV-Cache-Greedy) is not supported: it runs only the rows the next step will "
                "decode, which the release knows from a random decoding order drawn before each block "
                "(remasking=random only); no strategy here fixes its commits before the step. "
                f"Use one of {', '.join(VARIANTS)}"
            )
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if cache_reloading_step < 1:
            raise ValueError(f"cache_reloading_step must be an integer >= 1, got {cache_reloading_step}")
        if shift_type == "right":
            raise ValueError(
                "shift_type='right' is not supported: on Dream it caches row p once token p is decoded, so a masked "
                "column p + 1 loses the row that predicts it until the next refresh (the release reads -inf logits "
                "there). Use un or un_right"
            )
        if shift_type not in SHIFT_TYPES:
            raise ValueError(f"shift_type must be one of {', '.join(SHIFT_TYPES)}, got {shift_type!r}")
        self.variant, self.cache_reloading_step, self.shift_type = variant, cache_reloading_step, shift_type
        self.k = self.v = None

    # -- per call -----------------------------------------------------------------------------------------------

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        """Storage and per-row state, allocated when the batch shape changes and refilled in place otherwise, so
        the CUDA graphs of one shape serve every call of that shape."""
        a = model.args
        B, T = state.x.shape
        device = model.device
        shape = (a.n_layers, B, a.n_kv_heads, T + 1, a.head_dim)
        key = (shape, model.dtype, device, model.logit_shift, id(model))
        if key != self._shape:
            self.graphs.reset()  # the tensors below get new addresses
            self.k = self.v = None
            self.k = torch.zeros(shape, dtype=model.dtype, device=device)
            self.v = torch.zeros_like(self.k)
            self.real_keys = torch.ones(B, T, dtype=torch.bool, device=device)  # (B, T) True = not padding
            self.cos = torch.zeros(B, 1, T, a.rope_dim, dtype=torch.float32, device=device)  # canvas RoPE (rotated dims)
            self.sin = torch.zeros_like(self.cos)
            self.pinned = torch.zeros(B, T, dtype=torch.bool, device=device)  # rows the first step stores for good
            self.cached = torch.zeros_like(self.pinned)  # rows read from the cache this step
            self.pending = torch.zeros_like(self.pinned)  # rows read from it the step after
            self.block_steps = torch.zeros(B, dtype=torch.long, device=device)  # per row: steps in this block
            self.passes = torch.zeros_like(self.block_steps)  # per row: steps in this call
            self._shape = key
        self.length, self.shift, self.mask_token_id = T, model.logit_shift, state.mask_token_id
        if state.attention_mask is not None:
            self.real_keys.copy_(state.attention_mask)
        else:
            self.real_keys.fill_(True)
        cos, sin = model.rope(state.position_ids)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.pinned.zero_()
        if self.variant != "decode":  # the prompt's rows (prefill, pd)
            self.pinned.copy_(self._decoded_rows(state.x != state.mask_token_id, start=True) & self.real_keys)
        self.cached.zero_()
        self.pending.zero_()
        self.block_steps.zero_()
        self.passes.zero_()

    def begin_block(self, state: DecodeState) -> None:
        """A block starts with a refresh. Its second step reads the rows decoded at the block start (Dream's
        release) or none (LLaDA's, which starts each block with an empty cache: that step reruns every row)."""
        self.block_steps.zero_()
        if self.shift:
            self.pending.copy_(self._decoded_rows(state.x != self.mask_token_id, start=True))
        else:
            self.pending.zero_()

    def _decoded_rows(self, decoded: torch.Tensor, start: bool = False) -> torch.Tensor:
        """decoded (B, T) bool (token is not a mask) -> (B, T) bool rows whose state counts as decoded.

        Dream (row p predicts column p + 1), as the release: ``un`` takes column p + 1's status, and the last row
        the first column's (``start``: a block's first set, where the release takes the last column's own);
        ``un_right`` both columns p and p + 1 (the last row repeats the row before it)."""
        if not self.shift:
            return decoded
        if self.shift_type == "un" or start:  # the release builds its first set this way whatever shift_type
            last = decoded[:, -1:] if start else decoded[:, :1]
            return torch.cat([decoded[:, 1:], last], dim=1)
        both = decoded[:, :-1] & decoded[:, 1:]  # (B, T - 1)
        return torch.cat([both, both[:, -1:]], dim=1)

    def _run(self, active: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the rows each active row runs this step.

        The call's first step runs every row; prefill then skips the prompt's rows; decode / pd skip the rows
        cached for this step (pd: and the prompt's), except at a refresh (every ``cache_reloading_step`` steps of
        the block), where only pd's prompt rows are skipped."""
        first = (self.passes == 0)[:, None]
        if self.variant == "prefill":
            skip = self.pinned
        else:
            refresh = (self.block_steps % self.cache_reloading_step == 0)[:, None]
            skip = torch.where(refresh, self.pinned, self.cached | self.pinned)
        return (first | ~skip) & self.real_keys & active[:, None]

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice,
                extra: Optional[ExtraRows] = None) -> StepLogits:
        if extra is not None or state.x.shape[1] != self.length:
            raise RuntimeError("dkv runs canvas rows of a fixed length only (check_compatible)")
        B, T = state.x.shape
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        most = int(self._run(active).sum(-1).max())  # the step's one host read: its shape
        M = max(1, min(T, -(-most // QUERY_BUCKET) * QUERY_BUCKET))
        mask = () if state.attention_mask is None else (state.attention_mask,)
        key = (B, T, M, targets.start, targets.stop, len(mask))
        logits, fresh = self.graphs.run(key, lambda x, act, *m: self._forward(model, x, act, m, M, targets),
                                        state.x, active, *mask)
        return StepLogits(logits, fresh)

    def _forward(self, model, x, active, mask, M: int, targets: slice):
        """x (B, T), active (B,) -> logits (B, len(targets), V), fresh (B, T). Runs M rows per batch row."""
        B, T = x.shape
        run = self._run(active)  # (B, T)
        index = torch.sort(run.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :M]  # (B, M)
        real = run.gather(1, index)  # (B, M): the row's run set in position order, then placeholders
        rope = (gather_rope(self.cos, index), gather_rope(self.sin, index))
        h = model(x.gather(1, index), None, mask[0] if mask else None, self, None,
                  input_pos=store_index(index, real, T), rope=rope, hidden=True)  # (B, M, D)
        # The LM head runs on the asked-for columns only: each run row's hidden state goes to the column it
        # predicts (row + shift); slot L collects the rest.
        L = targets.stop - targets.start
        col = index + self.shift  # (B, M)
        in_targets = real & (col >= targets.start) & (col < targets.stop)
        slot = torch.where(in_targets, col - targets.start, L)  # (B, M)
        rows = h.new_zeros(B, L + 1, h.shape[-1]).scatter_(1, slot[..., None].expand(-1, -1, h.shape[-1]), h)
        logits = model.head(rows[:, :L])  # (B, L, V); columns without a run row: zeros
        logits = logits * in_targets.new_zeros(B, L + 1).scatter_(1, slot, True)[:, :L, None]
        fresh = torch.zeros(B, T + 1, dtype=torch.bool, device=x.device)
        fresh.scatter_(1, torch.where(real & (col < T), col, T), True)
        self.passes += active.long()
        return logits, fresh[:, :T]

    def end_step(self, state: DecodeState, out: StepOutput) -> None:
        """The delay: the rows decoded after this step are read from the cache the step after next."""
        B = state.x.shape[0]
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=state.x.device)
        decoded = self._decoded_rows(state.x != self.mask_token_id)
        act = active[:, None]
        self.cached.copy_(torch.where(act, self.pending, self.cached))  # in place: graphs read them
        self.pending.copy_(torch.where(act, decoded, self.pending))
        self.block_steps += active.long()
