"""WINO: wide-in, narrow-out revokable decoding (Hong et al., "Wide-In, Narrow-Out: Revokable Decoding for
Efficient and Effective DLLMs", arXiv:2507.18578, ICLR 2026; released code: Feng-Hong/WINO-DLLM
``LLaDA/decoding.py::decoding_wino``).

Each step makes one forward pass over the canvas plus a *shadow block*: one extra query per position of the
current block that predicts that position without attending to its current token (leave-one-out).

- Wide in: every masked position of the block whose confidence is > ``wide_in_thres`` is committed, at most
  ``clamp(floor(0.7 m), 5, 20)`` of them (m = masks left in the block; the most confident win) and at least
  ``num_transfer_tokens``.
- Narrow out: a position decoded in an earlier step whose shadow probability of its current token is
  < ``narrow_out_thres`` is suspicious. When the step accepted more than ``num_transfer_tokens`` tokens, the
  least confident suspicious positions are re-masked, at most ``a_prev - num_transfer_tokens`` of them, with
  ``a_prev`` the number accepted by the *previous* step of the block (30 before the first: the release's
  constants). This budget makes progress certain: after t steps of a block at least ``t * num_transfer_tokens``
  of its positions are decoded (the sum of accepts minus re-masks telescopes), so a block of L positions ends
  within ``ceil(L / num_transfer_tokens)`` steps with nothing left masked.

The window is the whole block for the whole block (the release's; d2Cache's port narrowed it, §14.7 of the
spec). Rows are independent: each has its own accept counts and ends its block on its own. Unlike the release, a
predicted [MASK] is never drafted (the release commits it and counts the position as decoded); deviations are
listed in docs/strategies.md.

Shadow block, LLaDA (row t predicts position t): shadow i is a [MASK] with the RoPE position of block column
s+i; it attends to every real key except column s+i and to every shadow token; no real token attends to the
shadow block. Dream (row t-1 predicts position t): the query that predicts column s+i must be a copy of column
s+i-1 at that column's position. Beside the [MASK] stand-ins above (shadow M_i, as for LLaDA), a second group
Q_i carries the token of column s+i-1; Q_i attends to every real key except column s+i, to every M_j (M_i is
the masked stand-in of s+i) and to itself, never to another Q (Q_{i+1} holds the token of s+i). Q_i's output
is the leave-one-out distribution of column s+i. As in the release, only the *direct* attention is left out:
deeper layers still carry column s+i through the other tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler, top_k_mask
from lmeval_dllm.samplers.certainty_prior import apply_certainty_prior, check_sigma
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import check_threshold
from lmeval_dllm.state import DecodeState, ExtraRows, StepLogits, StepOutput

# Constants of the release (decoding_wino): accept cap clamp(floor(0.7 m), 5, 20); a_prev before a block's first
# step. floor(0.7 m) is computed exactly as m * 7 // 10 (equal to the release's float product wherever the clamp
# leaves it unclamped, m < 29).
ACCEPT_FRACTION_TENTHS, MIN_CAP, MAX_CAP, FIRST_PREV_ACCEPT = 7, 5, 20, 30


def shadow_rows(x: torch.Tensor, position_ids: torch.Tensor, key_mask: Optional[torch.Tensor], block: slice,
                mask_token_id: int, logit_shift: int) -> ExtraRows:
    """WINO's shadow block, as extra rows run alongside the canvas (canvas rows never attend to them).

    Args:
        x, position_ids (`torch.LongTensor` of shape `(B, T)`): canvas and RoPE positions.
        key_mask (`torch.BoolTensor` of shape `(B, T)`, *optional*): True on real (non-padding) columns.
        block: the current block ``[s, s + L)``.
        logit_shift: 0 (LLaDA: row t predicts t) or 1 (Dream: row t-1 predicts t; needs s >= 1).

    Returns:
        :class:`ExtraRows` of E = L (LLaDA) or 2L (Dream) rows; the last L are the leave-one-out predictors of
        the block's columns, in order. ``sees`` (B, E, T + E): canvas keys first, then extra keys.
    """
    B, T = x.shape
    s, L = block.start, block.stop - block.start
    dev = x.device
    real = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    i = torch.arange(L, device=dev)
    # leave-one-out: shadow i may attend to every real key but column s + i
    loo = torch.ones(L, T, dtype=torch.bool, device=dev)
    loo[i, s + i] = False
    to_real = real[:, None, :] & loo  # (B, L, T)
    stand_ins = torch.full((B, L), mask_token_id, dtype=x.dtype, device=dev)
    ones = torch.ones(B, L, L, dtype=torch.bool, device=dev)
    if logit_shift == 0:  # shadow i: [MASK] at column s+i's position; sees the other shadow tokens (the release's)
        return ExtraRows(ids=stand_ins, position_ids=position_ids[:, s:s + L], sees=torch.cat([to_real, ones], -1))
    if s < 1:
        raise ValueError("WINO on Dream needs a token before the block (a non-empty prompt)")
    # Dream: stand-ins M_i as above, then predictors Q_i = column s+i-1 (token and position), which see the
    # real keys but s+i, every M_j and themselves only (Q_{i+1} carries the token of s+i)
    eye = torch.eye(L, dtype=torch.bool, device=dev).expand(B, L, L)
    m_rows = torch.cat([to_real, ones, torch.zeros_like(ones)], dim=-1)
    q_rows = torch.cat([to_real, ones, eye], dim=-1)
    return ExtraRows(ids=torch.cat([stand_ins, x[:, s - 1:s + L - 1]], dim=1),
                     position_ids=torch.cat([position_ids[:, s:s + L], position_ids[:, s - 1:s + L - 1]], dim=1),
                     sees=torch.cat([m_rows, q_rows], dim=1))


def token_probability(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """p(token) under softmax(logits), precise near 1: logits (B, L, V), token_ids (B, L) -> (B, L) float64.

    WINO ranks drafts by confidence and the release takes the softmax in float64, where 1 - 1e-9 and 1 - 1e-7
    differ; in float32 both round to 1.0 and would tie. The log-sum-exp is taken as ``max + log1p(rest)``, with
    ``rest`` the mass of everything but one top entry, which keeps that difference in float32; only the (B, L)
    result is float64 (a float64 softmax of (B, L, V) would double the memory).
    """
    top, top_index = logits.max(-1, keepdim=True)
    rest = (logits - top).exp().scatter(-1, top_index, 0.0).sum(-1)  # (B, L)
    log_p = logits.gather(-1, token_ids[..., None]).squeeze(-1) - top.squeeze(-1) - torch.log1p(rest)
    return log_p.double().exp()


class WinoSampler(Sampler):
    """Wide-in drafting above ``wide_in_thres``, narrow-out re-masking below ``narrow_out_thres`` (WINO,
    arXiv:2507.18578, Alg. 1; Feng-Hong/WINO-DLLM ``decoding_wino``).

    Args:
        proposal: token and confidence rule; the wide-in threshold applies to its confidence.
        wide_in_thres: commit masked positions with confidence strictly above this (release default 0.6; its
            task configs use 0.5-0.8).
        narrow_out_thres: re-mask decoded positions whose leave-one-out probability of their token is strictly
            below this (release default 0.9).
        num_transfer_tokens: the least number of tokens committed per step (the release: 1); re-masking needs
            a step that commits more than this, and re-masks at most the previous step's count minus this.
        sigma: certainty prior (``certainty_prior.py``): the wide-in score is the confidence times the density of
            decoded positions around each position (over the whole generation region), compared with
            ``wide_in_thres`` and ranked; the narrow-out check is unchanged. None = off.
    """

    name = "wino"
    can_remask = True
    cache_needs = frozenset({"extra_rows"})  # the shadow block runs as extra rows (prefix / dual caches serve it)

    def __init__(self, proposal: Proposal, *, wide_in_thres: float = 0.6, narrow_out_thres: float = 0.9,
                 num_transfer_tokens: int = 1, sigma: Optional[float] = None):
        super().__init__(proposal)
        check_threshold("wide_in_thres", wide_in_thres, proposal)
        check_sigma(sigma, proposal.confidence)
        if not 0.0 <= narrow_out_thres <= 1.0:
            raise ValueError(f"narrow_out_thres must be in [0, 1] (a probability), got {narrow_out_thres!r}")
        if num_transfer_tokens < 1:
            raise ValueError(f"num_transfer_tokens must be an integer >= 1, got {num_transfer_tokens}")
        self.wide_in_thres = wide_in_thres
        self.narrow_out_thres = narrow_out_thres
        self.num_transfer_tokens = num_transfer_tokens
        self.sigma = sigma

    def begin_block(self, state: DecodeState) -> None:
        state.sampler_state["prev_accept"] = torch.full((state.batch_size,), FIRST_PREV_ACCEPT, device=state.x.device)

    def _confidence(self, logits: torch.Tensor, token_ids: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """The proposal's confidence, in float64 precision where it is a token probability (LLaDA's
        ``low_confidence``: the clean softmax, as the release; Dream's ``maskgit_plus``: the filtered one)."""
        rule = self.proposal.confidence
        if rule not in ("low_confidence", "maskgit_plus"):
            return confidence.double()
        prop = self.proposal  # the distribution its confidence is read from, in the same order of edits
        if prop.logits_eos_inf:
            logits = logits.clone()
            logits[..., prop.eos_token_id] = float("-inf")
        source = logits if rule == "low_confidence" else prop.filtered(logits)
        if prop.confidence_eos_eot_inf:  # EOS / end-of-turn get confidence 0
            source = source.clone()
            source[..., [i for i in (prop.eos_token_id, prop.eot_token_id) if i is not None]] = float("-inf")
        return token_probability(source, token_ids)

    def forward(self, model, cache, state: DecodeState, span: slice) -> StepLogits:
        """(B, 2L, V): the block's ordinary distributions, then its leave-one-out ones."""
        extra = shadow_rows(state.x, state.position_ids, state.attention_mask, span, state.mask_token_id,
                            model.logit_shift)
        out = cache.forward(model, state, span, extra=extra)  # (B, L + E, V): block, then the extra rows
        L, logits = span.stop - span.start, out.logits
        if extra.count != L:
            logits = torch.cat([logits[:, :L], logits[:, -L:]], dim=1)
        return StepLogits(logits, out.fresh)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        """logits (`(B, 2L, V)` float32): :meth:`forward`'s output for the current block."""
        L = logits.shape[1] // 2
        main, shadow = logits[:, :L], logits[:, L:]
        cols = state.x[:, state.block]  # (B, L)
        masked = cols == state.mask_token_id
        active = state.active[:, None]
        n = self.num_transfer_tokens

        # Wide in: above the threshold, capped, at least n; the most confident first. [MASK] is never drafted (it
        # would count as accepted without decoding anything): the draft is the best other token, its confidence
        # that token's probability under the full distribution.
        no_mask = main.clone()
        no_mask[..., state.mask_token_id] = float("-inf")
        proposed = self.proposal(no_mask, state.generator)
        # float64-precise, as the release's float64 softmax: confident drafts are ranked against each other
        conf = self._confidence(main, proposed.tokens, proposed.confidence)
        conf = apply_certainty_prior(conf, state, state.block, self.sigma)  # (B, L) float64; unchanged without sigma
        cand = masked & active
        cap = (masked.sum(-1) * ACCEPT_FRACTION_TENTHS // 10).clamp(MIN_CAP, MAX_CAP).clamp(min=n)  # (B,)
        above = (cand & (conf > self.wide_in_thres)).sum(-1)
        commit = top_k_mask(conf, cand, torch.minimum(torch.maximum(above, torch.full_like(above, n)), cap))
        accepted = commit.sum(-1)

        # Narrow out: leave-one-out probability of each decoded token (the clean softmax, as the release).
        verify = token_probability(shadow, cols)
        suspicious = ~masked & active & (verify < self.narrow_out_thres)
        prev = state.sampler_state["prev_accept"]
        budget = torch.where(accepted > n, prev - n, 0).clamp(min=0)
        remask = top_k_mask(-verify, suspicious, budget)  # the least confident first
        state.sampler_state["prev_accept"] = torch.where(state.active, accepted, prev)
        return StepOutput(commit=commit, tokens=proposed.tokens, remask=remask)
