"""d3LLM's multi-block entropy-threshold decoding (Qian et al., "d3LLM: Ultra-Fast Diffusion LLM using
Pseudo-Trajectory Distillation", arXiv:2601.07568; released code hao-ai-lab/d3LLM
``d3llm/d3llm_LLaDA/d3llm_llada_generate_util.py::generate_multi_block`` and
``d3llm/d3llm_DREAM/d3llm_dream_generate_util.py::DreamGenerationMixin._sample_multi_block``).

The generation region is cut into blocks of ``block_length`` columns, and several blocks are decoded at once
(a pipeline). Per row, before every forward pass:

- block 1 exists from the start; while blocks remain, one more block is *added* when the last added block's
  decoded fraction is >= ``block_add_threshold`` (or it has no mask left); at most one block per pass;
- an added block k is *fully activated* when block k - 1's decoded fraction is >= ``decoded_token_threshold``
  (block 1: always); the release calls this ``is_complete``.

Every pass runs the whole canvas. The candidates are the masked positions of the added blocks. With the entropy
H of each candidate's distribution (softmax in float64, ``-sum p log(p + 1e-12)``, the release's formula):

- rule ``llada`` (the LLaDA file's ``get_transfer_index_entropy`` over all candidates): the lowest-entropy
  candidate, and every other with H <= ``threshold``;
- rule ``dream`` (the Dream file): every candidate with H < ``threshold``;

and, in both, if nothing was committed in the first fully activated block that still has masks, its
lowest-entropy candidate is (guaranteed progress). Tokens are the argmax (temperature 0) or a sample.

``early_stop`` (the release's name): after a pass's commits, every position after the row's first EOS is set to
EOS, masked or already decoded (the model sees EOS there from the next pass on; what is before the EOS still
decodes), and no block is added after an EOS. As in the release, whose fill selects from the mask map read before
it, the masks a fill set to EOS are candidates once more in the next pass (what they pick is set back to EOS, but
they take that pass's picks and count as progress in their block).

Rows are independent: each has its own blocks, so a left-padded batch gives each row what it gives alone.

Deviations from the released code (docs/strategies.md): any batch size (the release decodes one prompt at a
time); ties in entropy go to the lower position (the release's ``torch.topk`` order is unspecified); the NFE is the
forward passes made (the release's counter also counts the final iteration that an EOS fill ends without a
forward pass); the rule follows the model's family unless ``rule`` is given; only the no-cache decoder is
transcribed (``generate_multi_block_kv_cache``'s delayed block cache is not), and the package's caches compose
with the whole region as their block.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lmeval_dllm.samplers.base import Sampler
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.prophet import greedy_tokens
from lmeval_dllm.state import DecodeState, StepLogits, StepOutput

RULES = ("llada", "dream")
# Columns whose float64 entropy is computed at once: (B, chunk, V) float64 temporaries instead of (B, G, V).
ENTROPY_CHUNK = 64


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, G, V) in any float dtype -> (B, G) float64 entropy, the release's ``-sum(p * log(p + 1e-12))``
    with ``p = softmax(logits.double())``, a chunk of columns at a time."""
    out = []
    for c0 in range(0, logits.shape[1], ENTROPY_CHUNK):
        p = torch.softmax(logits[:, c0:c0 + ENTROPY_CHUNK].double(), dim=-1)
        out.append(-(p * torch.log(p + 1e-12)).sum(-1))
    return torch.cat(out, dim=1)


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, L) bool -> (B, L) bool: only the lowest True position of each row (none if the row has none)."""
    first = mask & (mask.long().cumsum(-1) == 1)
    return first


def lowest(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the candidate with the lowest score in each row (ties: the lower position); none if no
    candidate. scores (B, L) float, candidates (B, L) bool."""
    masked = scores.masked_fill(~candidates, float("inf"))
    best = masked.argmin(-1, keepdim=True)  # torch.argmin returns the first of tied minima
    one = torch.zeros_like(candidates).scatter_(-1, best, True)
    return one & candidates


class D3LLMSampler(Sampler):
    """Multi-block entropy-threshold decoding (d3LLM, arXiv:2601.07568): several blocks in flight, every
    candidate below an entropy threshold committed, a new block added once the last is partly decoded.

    Args (the release's names; ``block_length`` is the block size, the release's ``block_size``):
        proposal: token rule (temperature, top_p / top_k, logits_eos_inf). The selection score is always the
            entropy of the unfiltered distribution, as in the release: remasking / alg must stay at their default.
        threshold: entropy threshold in nats (>= 0). Release defaults: 0.5 (LLaDA function), 0.9 (Dream
            function); published settings 0.5, and 0.4 for d3LLM-Dream on GSM8K / MATH / MBPP.
        block_add_threshold: decoded fraction of the last block at which the next is added, in [0, 1] (1 = only
            when it is done). Release: 0.1 (lm-eval wrapper default and every published setting; 0.5 in the
            functions' signatures).
        decoded_token_threshold: decoded fraction of block k - 1 at which block k is fully activated, in [0, 1].
            Release: 0.95 (wrapper default, published settings; 0.5 in the signatures).
        early_stop: after the first EOS, set every later position to EOS (release default False; every published
            setting uses True). Needs the tokenizer's EOS id.
        rule: ``llada`` or ``dream`` (see the module docstring); None: the release's rule for the model's family
            (``dream`` for Dream checkpoints, ``llada`` otherwise).

    With ``block_add_threshold = decoded_token_threshold = 1`` and rule ``llada`` this is the semi-autoregressive
    entropy-threshold decoder of d3LLM's and dParallel's ``generate(threshold=...)``.

    Per-call memory (``state.sampler_state``): ``added`` (B,) long, the number of blocks each row has added;
    ``rule`` the rule in use.
    """

    name = "d3llm"
    logits_span = "generation"  # candidates lie in every block in flight
    multi_block = True

    def __init__(
        self,
        proposal: Proposal,
        *,
        threshold: float = 0.5,
        block_add_threshold: float = 0.1,
        decoded_token_threshold: float = 0.95,
        early_stop: bool = False,
        rule: Optional[str] = None,
    ):
        super().__init__(proposal)
        if proposal.confidence != "low_confidence":
            raise ValueError(f"strategy 'd3llm' scores candidates by the entropy of their distribution (the "
                             f"release's only rule at temperature 0); remasking / alg = {proposal.confidence!r} "
                             f"cannot be used with it: leave them unset")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0 (an entropy in nats), got {threshold!r}")
        for name, value in (("block_add_threshold", block_add_threshold),
                            ("decoded_token_threshold", decoded_token_threshold)):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1] (a decoded fraction of a block), got {value!r}")
        if rule is not None and rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)} (or None: the model family's), got {rule!r}")
        self.threshold = float(threshold)
        self.block_add_threshold = float(block_add_threshold)
        self.decoded_token_threshold = float(decoded_token_threshold)
        self.early_stop = early_stop
        self.rule = rule

    def start(self, state: DecodeState) -> None:
        if self.early_stop and self.proposal.eos_token_id is None:
            raise ValueError("strategy 'd3llm' with early_stop=True needs the tokenizer's EOS token id, and none is "
                             "bound")
        state.sampler_state["added"] = torch.ones(state.batch_size, dtype=torch.long, device=state.x.device)
        state.sampler_state["rule"] = self.rule
        state.sampler_state["filled"] = torch.zeros_like(state.x[:, state.prompt_len:], dtype=torch.bool)

    def forward(self, model, cache, state: DecodeState, span: slice) -> StepLogits:
        if state.sampler_state["rule"] is None:  # the release's rule follows the model file it ships with
            state.sampler_state["rule"] = "dream" if model.args.family == "dream" else "llada"
        return cache.forward(model, state, span)

    def reached(self, masks: torch.Tensor, Lb: int, bound: float) -> torch.Tensor:
        """masks (B, K) per block -> (B, K) bool: decoded fraction ``1 - masks / Lb`` >= bound (float64, as the
        release's Python arithmetic)."""
        return 1.0 - masks.double() / Lb >= bound

    def step(self, logits: torch.Tensor, state: DecodeState) -> StepOutput:
        mem, P, Lb = state.sampler_state, state.prompt_len, state.block_length
        B, G, _ = logits.shape
        K, dev = G // Lb, logits.device
        gen = state.x[:, P:]
        masked = gen == state.mask_token_id  # (B, G)
        masks = masked.view(B, K, Lb).sum(-1)  # (B, K) masks left in each block
        k = torch.arange(K, device=dev)

        # Blocks: add one when the last added block is far enough (or done); none after an EOS.
        added = mem["added"]
        last = (added - 1).clamp(max=K - 1)[:, None]
        last_masks = masks.gather(1, last)
        grow = (self.reached(last_masks, Lb, self.block_add_threshold) | (last_masks == 0)).squeeze(1) & (added < K)
        if self.early_stop:
            has_eos = (gen == self.proposal.eos_token_id).any(-1)
            grow &= ~has_eos
            added = torch.where(has_eos, K, added)  # the release marks the blocks after the EOS as done
        added = added + grow.long()
        mem["added"] = added
        in_flight = k[None, :] < added[:, None]  # (B, K)
        prev_far = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev),  # the prompt counts as decoded
                              self.reached(masks[:, :-1], Lb, self.decoded_token_threshold)], dim=1)
        activated = in_flight & prev_far  # fully activated blocks (the release's is_complete)

        col_block = torch.arange(G, device=dev) // Lb
        cand = state.candidates(slice(P, P + G)) & in_flight.gather(1, col_block.expand(B, G))
        if self.early_stop:
            # The release fills after the EOS at the top of its next iteration but selects from the mask map it read
            # before the fill: in that pass the masks just set to EOS are still candidates (their picks are set
            # back to EOS at once, but they take the pass's picks and count as progress in their block).
            filled = mem["filled"] & (state.active[:, None] if state.active is not None else True)
            cand = cand | filled
        entropy = entropy64(logits)  # (B, G) float64
        if (mem["rule"] or "llada") == "llada":
            commit = (cand & (entropy <= self.threshold)) | lowest(entropy, cand)
        else:
            commit = cand & (entropy < self.threshold)

        # Guaranteed progress: the first fully activated block that has masks gets its best candidate if this
        # pass committed nothing in it.
        first = first_true(activated & (masks > 0))  # (B, K)
        in_first = first.gather(1, col_block.expand(B, G))  # (B, G): columns of that block
        starved = ~(commit & in_first).any(-1, keepdim=True)
        commit |= lowest(entropy, cand & in_first) & starved

        if self.proposal.greedy:
            tokens = greedy_tokens(logits, self.proposal)
        else:
            tokens = self.proposal(logits.float(), state.generator).tokens
        overwrite = None
        if self.early_stop:
            eos = self.proposal.eos_token_id
            after = torch.where(commit & masked, tokens, gen) == eos
            after = (after.long().cumsum(-1) - after.long()) > 0  # (B, G): strictly after the first EOS
            overwrite = after & (gen != eos)
            tokens = torch.where(after, eos, tokens)
            # masks the release's next fill sets to EOS (candidates once more in its next pass); a position this
            # pass committed is a decoded token to the release by then, not a mask
            mem["filled"] = after & masked & ~commit
            commit &= ~after
        return StepOutput(commit=commit, tokens=tokens, overwrite=overwrite)
