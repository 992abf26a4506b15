"""Prophet: early commit decoding (Li et al., "Diffusion Language Models Know the Answer Before Decoding",
arXiv:2508.19982, ICLR 2026; released code pixeli99/Prophet ``generate_earlyexit.py::generate`` and
``should_early_exit``, driven by ``eval_llada.py``).

The decoding is LLaDA's (low-confidence remasking over semi-autoregressive blocks, ``steps`` or
``num_transfer_tokens`` as in ``vanilla``), with one test before every step. At a row's n-th forward pass
(n = 1, 2, ...) of ``total`` planned ones, the *answer gap* is the mean, over the ``answer_length`` generation
positions from ``answer_start`` on (clipped at the end of the region), of the top-1 minus top-2 **logit** at each
position (decoded positions included, as the release reads the logits of every position). When

    gap >= early_threshold  if n / total < 0.33,
    gap >= mid_threshold    if n / total < 0.67,
    gap >= late_threshold   otherwise,

the row "goes all in": every masked position of the whole generation region is committed to its proposed token
(the argmax at temperature 0) in that pass, and the row stops (its later blocks have no mask left, so the loop
spends no further pass on it). Otherwise the row takes the ordinary LLaDA step in its current block.

Rows are independent: each has its own pass count, gap and exit, so a left-padded batch gives each row exactly
what it gives alone. ``total`` is ``steps`` when given (the release's ``max_steps``), else the passes
``num_transfer_tokens`` per step needs, ``num_blocks * ceil(block_length / num_transfer_tokens)``.

With a cache that does not recompute every column at every pass (``StepLogits.fresh``), the gap of an answer
position is the one from its most recent real prediction, and the all-in commit covers the masked positions with
real predictions in that pass; a row that has gone all in then commits every masked position with real logits at
each later pass (no ordinary step), so its remaining blocks take one pass each. Without a cache (and with the
prefix cache, which recomputes the block and everything right of it) the commit is the release's, in one pass.

Deviations from the released code (docs/strategies.md): the answer region is a parameter (the release derives it
from its forced ``constraints_text`` tokens, which this strategy does not implement, or from a hand-given absolute
position); its default is the release's example position scaled to ``gen_length``; any batch size (the release
decodes one prompt at a time); ties in the ordinary step go to the lower position.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.samplers.base import top_k_mask
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler
from lmeval_dllm.state import DecodeState, StepOutput

# The release's phase boundaries on the decoding progress n / total (constants in ``should_early_exit``).
PHASE_BOUNDS = (0.33, 0.67)
# Default answer_start: the release's README and demo place the answer 200 of 256 (and 100 of 128) positions in.
DEFAULT_ANSWER_FRACTION = (25, 32)


def answer_gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit at each position: logits (B, A, V), any float dtype -> (B, A) float64.

    The subtraction is done in the logits' own dtype, as the release does before reading the value out (``.item()``),
    so a bfloat16 model's gaps round as the release's do."""
    top2 = torch.topk(logits, 2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).double()


def greedy_tokens(logits: torch.Tensor, proposal: Proposal) -> torch.Tensor:
    """(B, G, V) logits in any float dtype -> (B, G) the proposal's greedy token (argmax; never EOS with
    ``logits_eos_inf``). top_p / top_k never remove the argmax, so they do not change it; no float32 copy of the
    region is made (the argmax is exact in any dtype)."""
    if proposal.logits_eos_inf:
        logits = logits.clone()
        logits[..., proposal.eos_token_id] = float("-inf")
    return logits.argmax(-1)


class ProphetSampler(LowConfidenceSampler):
    """LLaDA low-confidence decoding that commits every remaining mask at once when the answer's top-2 logit gap
    clears a threshold that falls as decoding progresses (Prophet, arXiv:2508.19982).

    Args (the release's names, from ``eval_llada.py``):
        proposal: token and confidence rule (temperature, remasking / alg, EOS options).
        steps, num_transfer_tokens: the ordinary step's count, as in ``vanilla`` (one token per step by default).
        early_threshold: gap (in logits) needed while n / total < 0.33 (release default 7.5).
        mid_threshold: gap needed while 0.33 <= n / total < 0.67 (release default 5.0).
        late_threshold: gap needed from n / total >= 0.67 on (release default 2.5).
        answer_start: first answer position, counted from the start of the generation region (the release's
            ``answer_start``, which its eval derives from the forced constraints). None: ``25 * gen_length // 32``
            (200 of 256, the release's README example; 100 of 128, its demo).
        answer_length: number of answer positions averaged over (release default 5).

    Per-call memory (``state.sampler_state``): ``passes`` (B,) each row's forward passes so far, ``gap`` (B, A)
    the latest gap at each answer position, ``exited`` (B,) rows that have gone all in.
    """

    name = "prophet"
    logits_span = "generation"  # the answer region and the all-in commit reach past the current block

    def __init__(
        self,
        proposal: Proposal,
        *,
        steps: Optional[int] = None,
        num_transfer_tokens: Optional[int] = None,
        early_threshold: float = 7.5,
        mid_threshold: float = 5.0,
        late_threshold: float = 2.5,
        answer_start: Optional[int] = None,
        answer_length: int = 5,
    ):
        super().__init__(proposal, steps=steps, num_transfer_tokens=num_transfer_tokens)
        for name, value in (("early_threshold", early_threshold), ("mid_threshold", mid_threshold),
                            ("late_threshold", late_threshold)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (a gap between two logits), got {value!r}")
        if answer_start is not None and answer_start < 0:
            raise ValueError(f"answer_start must be an integer >= 0 (a position in the generation region, 0 = its "
                             f"first) or None, got {answer_start}")
        if answer_length < 1:
            raise ValueError(f"answer_length must be an integer >= 1, got {answer_length}")
        self.thresholds = (float(early_threshold), float(mid_threshold), float(late_threshold))
        self.answer_start = answer_start
        self.answer_length = answer_length

    def answer_span(self, gen_length: int) -> tuple[int, int]:
        """Generation columns [a0, a1) whose gap is averaged (clipped at the region's end, as the release)."""
        a0 = self.answer_start if self.answer_start is not None else \
            DEFAULT_ANSWER_FRACTION[0] * gen_length // DEFAULT_ANSWER_FRACTION[1]
        return a0, min(a0 + self.answer_length, gen_length)

    def validate_lengths(self, gen_length: int, block_length: int) -> None:
        super().validate_lengths(gen_length, block_length)
        a0, _ = self.answer_span(gen_length)
        if a0 >= gen_length:
            raise ValueError(f"answer_start={self.answer_start} lies outside the generation region (gen_length="
                             f"{gen_length}, positions 0..{gen_length - 1}); the early exit would never be tested")

    def total_passes(self, gen_length: int, block_length: int) -> int:
        """The planned forward passes, the denominator of the progress (the release's ``max_steps = steps``)."""
        if self.steps is not None:
            return self.steps
        return (gen_length // block_length) * -(-block_length // (self.num_transfer_tokens or 1))

    def start(self, state: DecodeState) -> None:
        B, dev = state.batch_size, state.x.device
        a0, a1 = self.answer_span(state.gen_length)
        mem = state.sampler_state
        mem["passes"] = torch.zeros(B, dtype=torch.long, device=dev)
        mem["gap"] = torch.full((B, a1 - a0), float("nan"), dtype=torch.float64, device=dev)  # NaN: not seen yet
        mem["exited"] = torch.zeros(B, dtype=torch.bool, device=dev)

    def begin_block(self, state: DecodeState) -> None:
        super().begin_block(state)
        if state.block_index == 0:
            Lb = state.block.stop - state.block.start
            state.sampler_state["total"] = self.total_passes(state.gen_length, Lb)

    def threshold_at(self, progress: torch.Tensor) -> torch.Tensor:
        """progress (B,) float64 -> (B,) float64 the gap threshold of each row's phase."""
        early, mid, late = (progress.new_tensor(t) for t in self.thresholds)
        return torch.where(progress < PHASE_BOUNDS[0], early, torch.where(progress < PHASE_BOUNDS[1], mid, late))

    def exits(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """(B,) bool: rows whose answer gap clears their phase's threshold at this pass; updates the gap memory.

        logits (B, G, V) of the generation region, in the model's dtype."""
        mem, P = state.sampler_state, state.prompt_len
        B, G, _ = logits.shape
        a0, a1 = self.answer_span(G)
        gap = answer_gap(logits[:, a0:a1])  # (B, A)
        seen = torch.ones_like(gap, dtype=torch.bool)
        if state.fresh is not None:  # a cache skipped these columns: keep their last real gap
            seen &= state.fresh[:, P + a0:P + a1]
        if state.active is not None:
            seen &= state.active[:, None]
        mem["gap"] = torch.where(seen, gap, mem["gap"])
        # The release averages a Python list left to right in float64; the same order here, so ties round alike.
        total = mem["gap"][:, 0]
        for j in range(1, a1 - a0):
            total = total + mem["gap"][:, j]
        mean = total / (a1 - a0)  # NaN (never exits) until every answer position has been seen
        progress = (mem["passes"] + 1).double() / mem["total"]  # the release's global_step / max_steps, 1-based
        return mean >= self.threshold_at(progress)

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        mem, P = state.sampler_state, state.prompt_len
        B, G, _ = logits.shape
        s, e = state.block.start - P, state.block.stop - P
        active = state.active if state.active is not None else torch.ones(B, dtype=torch.bool, device=logits.device)

        exited = mem["exited"] | (self.exits(logits, state) & active)
        mem["exited"] = exited
        mem["passes"] = mem["passes"] + active.long()

        # The ordinary step: LLaDA's top-n of the block (the loop hands over the region in the model's dtype).
        proposed = self.proposal(logits[:, s:e].float(), state.generator)
        block_commit = top_k_mask(proposed.confidence, state.candidates(state.block), self.min_count(state))
        commit = torch.zeros(B, G, dtype=torch.bool, device=logits.device)
        commit[:, s:e] = block_commit

        # All in: every masked position of the region with real logits, to the proposal's token.
        if self.proposal.greedy:
            region_tokens = greedy_tokens(logits, self.proposal)
        else:
            region_tokens = self.proposal(logits.float(), state.generator).tokens
        tokens = region_tokens.clone()
        tokens[:, s:e] = proposed.tokens
        every_mask = state.candidates(slice(P, P + G))
        commit = torch.where(exited[:, None], every_mask, commit)
        tokens = torch.where(exited[:, None], region_tokens, tokens)
        return StepOutput(commit=commit, tokens=tokens)
