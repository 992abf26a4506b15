"""DAEDAL: variable-length denoising (Li et al., "Beyond Fixed: Training-Free Variable-Length Denoising for
Diffusion Large Language Models", arXiv:2508.00819, ICLR 2026; released code: Li-Jinsong/DAEDAL
``models/LLaDA_DAEDAL.py::generate``).

Each row starts from ``initial_gen_length`` masks and chooses its own length, up to ``max_gen_length``:

1. Initial length adjustment. While the row's *EOS confidence* is below ``initial_eot_expand_thres``, append
   ``expansion_factor`` masks (one forward pass each, nothing committed). Once it is reached (or the row is at
   ``max_gen_length``), append ``num_check_last_eot // 2`` EOS tokens (the release's EOS tail; they stay in the
   row, as decoded tokens) and start denoising.
2. Iterative denoising with mask insertion, block by block (``block_length`` from the prompt): commit every
   masked position of the block whose confidence is > ``threshold`` (at least the most confident one; a
   predicted [MASK] is never committed). If the row's EOS confidence is below ``decode_eot_expand_thres`` and
   the row is shorter than ``max_gen_length``, its least confident uncommitted mask of the block with
   confidence < ``low_conf_expand_thres`` becomes ``expansion_factor`` masks (everything after it shifts right;
   what passes ``max_gen_length`` is dropped).

EOS confidence of a row: over its positions whose most likely token is EOS, the mean EOS probability of the
rightmost ``num_check_last_eot`` of them, always divided by ``num_check_last_eot`` (fewer such positions give
a smaller value). It is read from the model's real distribution at every position, decoded ones included, as
the release does (d2Cache's port read -inf there and got NaN after the first step: §14.8).

Rows are independent (their own stage, length, expansions); a batch gives each row what it gives alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler, top_k_mask
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import check_threshold
from lmeval_dllm.state import CanvasEdit, DecodeState, StepOutput


def eos_confidence(logits: torch.Tensor, lengths: torch.Tensor, eos_token_id: int, last: int,
                   fresh: Optional[torch.Tensor] = None, chunk: int = 256) -> torch.Tensor:
    """DAEDAL's sequence-completion signal (``_calculate_eos_confidence`` of the release).

    logits (B, G, V) of the generation region (any float dtype), lengths (B,) -> (B,) float32: the sum of
    p(EOS) over the rightmost ``last`` positions (within the row's length) whose argmax is EOS, divided by
    ``last``. ``fresh`` (B, G): the positions whose logits a cache recomputed this step (the others are
    placeholders and do not count). p(EOS) is computed in float32, ``chunk`` columns at a time, so a bfloat16
    (B, G, V) region is never copied to float32 whole (at G = 2048 that copy alone would be 1 GiB per row).
    """
    G = logits.shape[1]
    inside = torch.arange(G, device=logits.device)[None, :] < lengths[:, None]
    if fresh is not None:
        inside = inside & fresh
    is_eos = (logits.argmax(-1) == eos_token_id) & inside  # (B, G); argmax is exact in any dtype
    p_eos = torch.cat([
        (c[..., eos_token_id].float() - torch.logsumexp(c.float(), dim=-1)).exp()
        for c in logits.split(chunk, dim=1)
    ], dim=1)
    from_right = is_eos.flip(-1).long().cumsum(-1).flip(-1)  # EOS predictions at or right of each position
    return torch.where(is_eos & (from_right <= last), p_eos, 0.0).sum(-1) / last


class DaedalSampler(Sampler):
    """Grow each row until the model expects it to end; insert masks where it is unsure (DAEDAL,
    arXiv:2508.00819, Alg. 1; Li-Jinsong/DAEDAL ``generate``).

    Args (release names in parentheses):
        proposal: token and confidence rule (the release: LLaDA's, greedy or Gumbel sampling).
        initial_gen_length: starting length of every row (``initial_gen_length``, 64).
        max_gen_length: no row grows past this (``max_gen_length``, 2048).
        threshold: commit masked block positions with confidence strictly above this
            (``high_conf_threshold``, 0.9); at least one per step.
        initial_eot_expand_thres: stage 1 appends masks while the EOS confidence is below this
            (``eos_confidence_threshold``, 0.5).
        decode_eot_expand_thres: stage 2 may insert masks while the EOS confidence is below this
            (``expand_eos_confidence_threshold``, 0.9).
        low_conf_expand_thres: a mask with confidence below this may become an expansion point
            (``low_conf_threshold``, 0.1).
        num_check_last_eot: EOS predictions the EOS confidence averages over; also twice the EOS tail
            (``eos_check_tokens``, 32).
        expansion_factor: masks appended per stage-1 step, and masks one expansion point becomes
            (``expansion_factor``, 8).
    """

    name = "daedal"
    logits_span = "generation"  # the EOS confidence reads the whole row
    sizes_canvas = True
    cache_needs = frozenset({"resize"})  # rows grow and content moves (prefix / dual caches follow)

    def __init__(
        self,
        proposal: Proposal,
        *,
        initial_gen_length: int = 64,
        max_gen_length: int = 2048,
        threshold: float = 0.9,
        initial_eot_expand_thres: float = 0.5,
        decode_eot_expand_thres: float = 0.9,
        low_conf_expand_thres: float = 0.1,
        num_check_last_eot: int = 32,
        expansion_factor: int = 8,
    ):
        super().__init__(proposal)
        if initial_gen_length < 1:
            raise ValueError(f"initial_gen_length must be an integer >= 1, got {initial_gen_length}")
        if max_gen_length < initial_gen_length:
            raise ValueError(f"max_gen_length must be >= initial_gen_length={initial_gen_length}, got {max_gen_length}")
        check_threshold("threshold", threshold, proposal)
        for name, value in [("initial_eot_expand_thres", initial_eot_expand_thres),
                            ("decode_eot_expand_thres", decode_eot_expand_thres),
                            ("low_conf_expand_thres", low_conf_expand_thres)]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (a probability), got {value!r}")
        if num_check_last_eot < 1:
            raise ValueError(f"num_check_last_eot must be an integer >= 1, got {num_check_last_eot}")
        if expansion_factor < 1:
            raise ValueError(f"expansion_factor must be an integer >= 1, got {expansion_factor}")
        self.initial_gen_length = initial_gen_length
        self.max_gen_length = max_gen_length
        self.threshold = threshold
        self.initial_eot_expand_thres = initial_eot_expand_thres
        self.decode_eot_expand_thres = decode_eot_expand_thres
        self.low_conf_expand_thres = low_conf_expand_thres
        self.num_check_last_eot = num_check_last_eot
        self.expansion_factor = expansion_factor

    def start(self, state: DecodeState) -> None:
        if self.proposal.eos_token_id is None:
            raise ValueError("strategy 'daedal' needs the EOS token id (bind the proposal to the tokenizer's)")
        B, dev = state.batch_size, state.x.device
        if state.gen_lengths is None:
            state.gen_lengths = torch.full((B,), state.gen_length, dtype=torch.long, device=dev)
        state.sampler_state.update(sized=torch.zeros(B, dtype=torch.bool, device=dev))

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        """logits (`(B, G, V)`, the model's dtype): the whole generation region of the current canvas. Only the
        block is converted to float32 (the EOS confidence reads the rest in chunks).

        Returns the commits of the block and, in ``StepOutput.edit``, this step's structural change (stage-1
        growth, the EOS tail, or one mask insertion per row), which the loop applies after the commits."""
        ss, P, mask_id, eos = state.sampler_state, state.prompt_len, state.mask_token_id, self.proposal.eos_token_id
        lengths, active, sized = state.gen_lengths, state.active, ss["sized"]
        fresh = state.fresh[:, P:] if state.fresh is not None else None
        eos_conf = eos_confidence(logits, lengths, eos, self.num_check_last_eot, fresh)
        short = lengths < self.max_gen_length

        # Stage 1: rows still choosing their initial length commit nothing this step.
        sizing = active & ~sized
        grow = sizing & short & (eos_conf < self.initial_eot_expand_thres)
        sized_now = sizing & ~grow

        # Stage 2: threshold commits in the block, at least the most confident one that is not [MASK].
        decoding = active & sized
        bs, be = state.block.start - P, state.block.stop - P
        block_logits = logits[:, bs:be].float()
        proposed = self.proposal(block_logits, state.generator)
        tokens = proposed.tokens
        conf = self._confidence(block_logits, tokens, proposed.confidence)
        cand = (state.x[:, state.block] == mask_id) & decoding[:, None]  # (B, Lb)
        eligible = cand & (tokens != mask_id)
        commit = eligible & (conf > self.threshold)
        fallback = ~commit.any(-1)
        commit |= top_k_mask(conf, eligible, fallback.long())
        # Every candidate predicted [MASK]: the release fills the best of them with its best other token.
        stuck = fallback & ~eligible.any(-1)
        no_mask = block_logits.clone()
        no_mask[..., mask_id] = float("-inf")
        alt = torch.softmax(no_mask, dim=-1).max(-1)
        unstick = top_k_mask(alt.values, cand, stuck.long())
        commit |= unstick
        tokens = torch.where(unstick, alt.indices, tokens)

        # Expansion point: the least confident uncommitted mask under low_conf_expand_thres.
        may_expand = decoding & short & (eos_conf < self.decode_eot_expand_thres)
        low = cand & ~commit & (conf < self.low_conf_expand_thres) & may_expand[:, None]
        point = top_k_mask(-conf, low, torch.ones_like(lengths))
        expand_at = torch.where(low.any(-1), bs + point.long().argmax(-1), -1)  # generation column or -1

        G = logits.shape[1]
        full_commit = torch.zeros(commit.shape[0], G, dtype=torch.bool, device=commit.device)
        full_tokens = torch.full_like(full_commit, mask_id, dtype=torch.long)
        full_commit[:, bs:be], full_tokens[:, bs:be] = commit, tokens
        ss["sized"] = sized | sized_now
        return StepOutput(commit=full_commit, tokens=full_tokens,
                          edit=self._edit(lengths, grow, sized_now, expand_at, mask_id))

    def _edit(self, lengths, grow, sized_now, expand_at, mask_id: int) -> CanvasEdit:
        """This step's change of each row: stage-1 growth (``expansion_factor`` masks at its end), the EOS tail
        once it is sized (``num_check_last_eot // 2`` EOS at its end), or one mask becoming ``expansion_factor``
        masks (``expansion_factor - 1`` inserted before it). All (B,)."""
        E = self.expansion_factor
        expanding = expand_at >= 0
        at = torch.where(expanding, expand_at, lengths)  # stage 1 and the tail append at the row's end
        count = torch.where(grow, E, torch.where(sized_now, self.num_check_last_eot // 2,
                                                 torch.where(expanding, E - 1, 0)))
        token_ids = torch.where(sized_now, self.proposal.eos_token_id, mask_id)
        return CanvasEdit(at=at, count=count, token_ids=token_ids, pad_token_id=self.proposal.eos_token_id,
                          max_length=self.max_gen_length)

    def step_budget(self, block_length: int) -> int:
        """Stage 1 takes up to ``(max_gen_length - initial_gen_length) / expansion_factor`` steps without a commit,
        and every insertion adds masks to the block; a block commits at least one position per other step."""
        growth = -(-(self.max_gen_length - self.initial_gen_length) // self.expansion_factor)
        return growth + 2 * self.max_gen_length + 4 * block_length + 16

    def _confidence(self, logits: torch.Tensor, token_ids: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """LLaDA's confidence as the release rounds it: a float32 softmax, then the token's entry. Near 1,
        ``exp(log p)`` (the proposal's formula) and the softmax round differently, and which of two confident
        drafts is committed first depends on it; equal values then go to the lower position, as in the release's
        sort. Other confidence rules: the proposal's."""
        prop = self.proposal
        if prop.confidence != "low_confidence" or prop.confidence_eos_eot_inf or prop.logits_eos_inf:
            return confidence
        return torch.softmax(logits, dim=-1).gather(-1, token_ids[..., None]).squeeze(-1)
