"""LLaDA2.1's token-editing decoder (inclusionAI, "LLaDA2.1", arXiv:2602.08676, section 2, eqs. 1-3; released code:
the ``generate`` method of the LLaDA2.1 hub file ``modeling_llada2_moe.py``, read in the copy vendored by
ZHZisZZ/dllm ``dllm/pipelines/llada21/models/modeling_llada21_moe.py``).

Each pass over the current block does two things at once, from one forward pass:

- **M2T** (mask to token): every masked position whose proposed token has probability ``> threshold`` is
  committed; when fewer than ``num_to_transfer`` are, the ``num_to_transfer`` most confident masked positions are
  (so at least one per pass while masks remain).
- **T2T** (token to token): every already-decoded *answer* position of the block (committed in an earlier pass of
  this block; never a prompt column, never a finished block) whose proposed token differs from the current one
  and has probability ``> editing_threshold`` is overwritten with it (``StepOutput.revise``). Edits never turn
  a token back into a mask.

A block is done when a pass that started without a mask edited nothing, or after ``max_post_steps`` mask-free
passes (the release increments its post-step counter before the forward of every mask-free pass and leaves the
block once it exceeds ``max_post_steps``): so after the last mask is filled there is always at least one more
pass, the editing check. This is :meth:`block_continues`; the per-row counters live in ``state.sampler_state``,
so a left-padded batch gives each row what it gives alone.

Deviations from the released code (docs/strategies.md): any batch size (the release decodes one prompt);
ties in the M2T fallback go to the lower position (``torch.topk``'s order is unspecified); a row stops at the end
of the block where its answer is complete (a stop token with nothing undecided before it), where the release
without ``eos_early_stop`` runs its remaining blocks and cuts the answer at the first EOS (same tokens, fewer
passes).
"""

from __future__ import annotations

import math

import torch

from lmeval_dllm.samplers.base import Sampler, top_k_mask
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.state import DecodeState, StepOutput

# Confidences that are a probability of the proposed token (the release's ``p``): the thresholds compare to them.
PROBABILITY_CONFIDENCES = ("low_confidence", "maskgit_plus")


def check_probability(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


class LLaDA21EditSampler(Sampler):
    """M2T threshold commits plus T2T token edits inside the current block (LLaDA2.1).

    Args:
        proposal: token and confidence rule; the confidence must be the proposed token's probability
            (``remasking=low_confidence`` (default) or ``alg=maskgit_plus``; the two agree at temperature 0).
        threshold: M2T: masked positions with probability above it are committed (release default 0.95).
        editing_threshold: T2T: decoded positions whose proposed token differs and has probability above it are
            overwritten (release default 0.9; 0 accepts every change, SGLang's ``edit_threshold`` default).
        max_post_steps: most mask-free passes per block (release default 16; 0 = no editing pass after the block
            is filled).
        num_to_transfer: M2T floor: at least this many masked positions are committed per pass (release default 1).
    """

    name = "llada21_edit"
    can_edit = True
    cache_needs = frozenset({"decoded_logits"})  # T2T reads the logits of the block's decoded columns

    def __init__(self, proposal: Proposal, *, threshold: float = 0.95, editing_threshold: float = 0.9,
                 max_post_steps: int = 16, num_to_transfer: int = 1):
        super().__init__(proposal)
        if proposal.confidence not in PROBABILITY_CONFIDENCES:
            raise ValueError(
                f"strategy 'llada21_edit' compares the proposed token's probability to threshold and "
                f"editing_threshold; the confidence {proposal.confidence!r} is not that probability: use "
                f"remasking=low_confidence (the default) or alg=maskgit_plus")
        check_probability("threshold", threshold)
        check_probability("editing_threshold", editing_threshold)
        if not (isinstance(max_post_steps, int) and max_post_steps >= 0):
            raise ValueError(f"max_post_steps must be an integer >= 0 (mask-free passes per block), got "
                             f"{max_post_steps!r}")
        if not (isinstance(num_to_transfer, int) and num_to_transfer >= 1):
            raise ValueError(f"num_to_transfer must be an integer >= 1 (masked positions committed per pass at "
                             f"least), got {num_to_transfer!r}")
        self.threshold = float(threshold)
        self.editing_threshold = float(editing_threshold)
        self.max_post_steps = max_post_steps
        self.num_to_transfer = num_to_transfer

    def begin_block(self, state: DecodeState) -> None:
        B, dev = state.batch_size, state.x.device
        state.sampler_state["post_steps"] = torch.zeros(B, dtype=torch.long, device=dev)  # mask-free passes
        state.sampler_state["block_done"] = torch.zeros(B, dtype=torch.bool, device=dev)

    def block_continues(self, state: DecodeState, has_mask: torch.Tensor) -> torch.Tensor:
        ss = state.sampler_state
        done = ss["block_done"]
        # A row whose answer ends before this block (a batch's shorter rows on a block-aligned canvas) has neither
        # a mask nor a decoded column in it: nothing to edit, no pass.
        done |= ~has_mask & ~(state.decoded_at[:, state.block] >= 0).any(-1)
        ss["post_steps"] += (~has_mask & ~done).long()  # the release counts a mask-free pass before its forward
        done |= ~has_mask & (ss["post_steps"] > self.max_post_steps)
        ss["mask_free"] = ~has_mask  # (B,) this pass starts with the block filled
        return ~done

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        proposed = self.proposal(logits, state.generator)
        p, x0 = proposed.confidence, proposed.tokens  # (B, L)
        block = state.block
        cols = state.x[:, block]
        masked = state.candidates(block)  # masked, active, real logits
        # M2T: every mask above the threshold (strict, as released), or the num_to_transfer best if fewer.
        n = torch.full((state.batch_size,), self.num_to_transfer, device=state.x.device)
        commit = (masked & (p > self.threshold)) | top_k_mask(p, masked, n)
        # T2T: decoded answer columns of this block (the loop applies the same restriction) that change.
        editable = (cols != state.mask_token_id) & (state.decoded_at[:, block] >= 0)
        if state.fresh is not None:
            editable &= state.fresh[:, block]
        if state.active is not None:
            editable &= state.active[:, None]
        edit = editable & (p > self.editing_threshold) & (x0 != cols)
        ss = state.sampler_state
        ss["block_done"] |= ss["mask_free"] & ~edit.any(-1)  # a mask-free pass that edited nothing ends the block
        return StepOutput(commit=commit, tokens=x0, revise=edit)

    def step_budget(self, block_length: int) -> int:
        # at least one commit per pass while masks remain, then at most max_post_steps mask-free passes
        return block_length + self.max_post_steps + 1
