"""The decode loop: one function that every strategy and cache plugs into.

``generate(model, prompt_ids, prompt_mask, sampler, config)`` does, for a batch of left-padded prompts:

1. Build the canvas ``x = [prompt ; [MASK] * gen_length]`` (B, T), the key-padding mask and RoPE positions
   derived from it (padding consumes no position, so a padded prompt sees exactly what it sees alone). A
   sampler that chooses the length itself (``sizes_canvas``, DAEDAL) starts from its ``initial_gen_length``.
   A block-causal model (``model.block_size``: SDAR) gets the release's block-aligned canvas instead
   (:func:`block_aligned_canvas`): every row's blocks are canvas blocks, the first decoded block starts with each
   row's prompt tail, and each row's answer starts after its own tail (the outputs are per row, left-aligned).
2. For each block of ``block_length`` columns, while blocks remain (semi-autoregressive decoding; one block =
   pure diffusion):
   a. a row is *active* if it is not finished and its block still has masks (``Sampler.block_continues``: an
      editing sampler may keep a mask-free block for more passes);
   b. the cache returns the logits of the span the sampler looks at (the block, or the whole generation);
   c. the sampler decides which masked positions to commit (and, if it can, which to re-mask, or which
      decoded positions of the block to revise to another token: ``StepOutput.revise``, LLaDA2.1; positions set
      outright, masked or decoded, are ``StepOutput.overwrite``, d3LLM's EOS fill);
   d. the decision is applied to active rows only; every active row counts one forward pass (NFE);
   e. a sampler may return a structural edit of the canvas with its decision (``StepOutput.edit``, a
      :class:`~lmeval_dllm.state.CanvasEdit`: DAEDAL grows rows and inserts masks); the loop applies it. Rows then
      have their own lengths; the columns past a row's length are hidden from attention and never candidates, and
      the block loop runs until no block is left in the widest row.
   f. a ``multi_block`` sampler (d3LLM) keeps several blocks in flight: the loop then runs one block spanning the
      whole region and the sampler schedules its own blocks of ``block_length`` inside it.
   g. a family with ``autoregressive_block_start`` (Fast-dLLM v2) commits each attention block's first column
      greedily on entering it, from the cache's pass that stores the block before it (:func:`commit_block_start`;
      one forward pass), before any strategy step; its canvas has one column after the last block for the last one.
   h. a block that is still undecided after ``Sampler.step_budget(block_length)`` forward passes stops the call
      with an error naming the block, the step and the rows (a cache or sampler that never decodes would
      otherwise spin forever).
3. A row *finishes* once a stop token (EOS / end-of-turn) is committed and every position before the first
   one is decoded: nothing it could still decode would change its answer, so stopping early gives exactly
   the tokens of running to the end. A caller-supplied ``block_done`` check (stop strings) is applied at
   block ends, where everything left of the block is final.

The step itself has no per-row Python and no host sync; the loop reads one boolean per step (is any row
still active?) and one per block (is every row finished?). An edit adds one sync per step (the new canvas
width). The logits a sampler gets are float32 for the block span; for the "generation" span they stay in the
model's dtype and the sampler converts the rows it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lmeval_dllm.caches.base import Cache, check_compatible
from lmeval_dllm.models import DiffusionLM, block_causal_families, family_named
from lmeval_dllm.samplers.base import Sampler
from lmeval_dllm.state import DecodeState, GenerationConfig

__all__ = ["GenerationConfig", "GenerationOutput", "finished_rows", "first_stop", "generate"]


@dataclass
class GenerationOutput:
    # (B, G) long: generation region ([MASK] where a finished row stopped early). A block-causal model: each row's
    # answer columns, left-aligned (its first gen_lengths[b]; [MASK] after them)
    tokens: torch.Tensor
    nfe: torch.Tensor  # (B,) long: forward passes in which the row was active
    committed: torch.Tensor  # (B,) long: positions committed (re-masked ones count again when re-committed)
    answer_length: torch.Tensor  # (B,) long: index of the first stop token, or the row's length if none
    decoded_at: torch.Tensor  # (B, G) long: forward pass (0-based) that committed each position, -1 if none
    steps: int  # forward passes made for the whole batch
    # (B,) long: each row's generation length (G unless the sampler resized rows; a block-causal model's canvas
    # gives a row whose prompt ends inside a block G + block - (L mod block), as the release)
    gen_lengths: torch.Tensor


def first_stop(gen: torch.Tensor, stop_token_ids: torch.Tensor) -> torch.Tensor:
    """gen (B, G) -> (B,) index of the first stop token in each row, G where there is none."""
    is_stop = torch.isin(gen, stop_token_ids)
    return torch.where(is_stop.any(-1), is_stop.int().argmax(-1), gen.shape[-1])


def finished_rows(gen: torch.Tensor, stop_token_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """(B,) bool: a stop token is committed and no mask is left before the first one."""
    end = first_stop(gen, stop_token_ids)
    col = torch.arange(gen.shape[-1], device=gen.device)
    undecided_before = ((gen == mask_token_id) & (col[None, :] < end[:, None])).any(-1)
    return (end < gen.shape[-1]) & ~undecided_before


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompt_ids: torch.Tensor,
    prompt_mask: Optional[torch.Tensor],
    sampler: Sampler,
    config: GenerationConfig,
    *,
    stop_token_ids: torch.Tensor,
    cache: Optional[Cache] = None,
    generator: Optional[torch.Generator] = None,
    block_done: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> GenerationOutput:
    """Decode ``config.gen_length`` tokens after each (left-padded) prompt.

    Args:
        model: a :class:`DiffusionLM` (LLaDA or Dream).
        prompt_ids (`torch.LongTensor` of shape `(B, P)`): prompts, left-padded.
        prompt_mask (`torch.BoolTensor` of shape `(B, P)`, *optional*): True on real prompt tokens.
        sampler: the strategy (``lmeval_dllm.samplers``).
        config: gen_length / block_length (gen_length None iff the sampler ``sizes_canvas``).
        stop_token_ids (`torch.LongTensor` of shape `(S,)`): tokens that end an answer (EOS, end-of-turn).
        cache: an approximate cache (``lmeval_dllm.caches``); None = exact computation.
        generator: RNG for sampling (temperature > 0, random remasking).
        block_done: ``f(gen (B, G), finished (B,)) -> (B,) bool`` evaluated after each block, e.g. "the
            decoded text contains a stop string"; rows it marks are finished.
    """
    if sampler.sizes_canvas != (config.gen_length is None):
        raise ValueError(
            f"strategy {sampler.name!r} chooses the generation length itself: give gen_length=None"
            if sampler.sizes_canvas else f"strategy {sampler.name!r} needs a gen_length"
        )
    sampler.validate_lengths(config.gen_length, config.block_length)
    cache = cache if cache is not None else Cache()
    check_compatible(sampler, cache)
    check_block_causal(model.block_size, sampler, cache, config.block_length)
    device = model.device
    B, P = prompt_ids.shape
    G = sampler.initial_gen_length if sampler.sizes_canvas else config.gen_length
    mask_id = model.mask_token_id
    prompt_ids = prompt_ids.to(device)
    stop_token_ids = stop_token_ids.to(device)
    answer_start = answer_width = None
    # Fast-dLLM v2: each attention block's first column is the greedy prediction of the pass that stores the block
    # before it (commit_block_start), and one column follows the last block
    greedy_start = model.block_size is not None and family_named(model.args.family).autoregressive_block_start
    if model.block_size is not None:
        # what fills the columns outside a row (hidden from attention; embedded, so a real token id)
        fill = next((t for t in (model.args.pad_token_id, model.args.eos_token_id) if isinstance(t, int)), 0)
        x, attention_mask, position_ids, P, answer_start, answer_width = block_aligned_canvas(
            prompt_ids, prompt_mask, G, model.block_size, mask_id, fill, greedy_block_start=greedy_start)
    else:
        x = torch.cat([prompt_ids, torch.full((B, G), mask_id, dtype=torch.long, device=device)], dim=1)  # (B, T)
        attention_mask, position_ids = None, torch.arange(P + G, device=device).expand(B, -1)
        if prompt_mask is not None and not bool(prompt_mask.all()):  # one sync per call, not per step
            prompt_mask = prompt_mask.to(device=device, dtype=torch.bool)
            attention_mask = torch.cat([prompt_mask, torch.ones(B, G, dtype=torch.bool, device=device)], dim=1)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    state = DecodeState(
        x=x, position_ids=position_ids, attention_mask=attention_mask, prompt_len=P, mask_token_id=mask_id,
        stop_token_ids=stop_token_ids, generator=generator,
        decoded_at=torch.full(x.shape, -1, dtype=torch.long, device=device),
        answer_start=answer_start, budget_blocks=None if answer_start is None else G // config.block_length,
    )

    def answers(t: torch.Tensor) -> torch.Tensor:
        """(B, T) canvas tensor -> (B, G') each row's answer columns, left-aligned (the generation region for a
        bidirectional model; a block-aligned canvas starts each row's answer after its prompt tail)."""
        gen = t[:, P:]
        if answer_start is None:
            return gen
        return answer_columns(gen, answer_start, answer_width, fill=mask_id)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    committed = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    sampler.start(state)
    cache.setup(model, state)

    if sampler.multi_block and sampler.sizes_canvas:
        raise ValueError(f"strategy {sampler.name!r} declares both multi_block and sizes_canvas; the loop supports "
                         f"one of them")
    state.block_length = config.block_length
    # A multi-block sampler (d3LLM) schedules its own blocks: the loop's one block is the whole region.
    Lb, b = (G if sampler.multi_block else config.block_length), 0
    revises = sampler.can_remask or sampler.can_edit
    while P + b * Lb < state.x.shape[1]:  # a block remains (a resizing sampler may widen the canvas)
        start = P + b * Lb
        state.block = slice(start, min(start + Lb, state.x.shape[1]))
        state.block_index, state.step_in_block = b, 0
        cache.begin_block(state)
        if greedy_start and start > 0 and (start - P) % model.block_size == 0:
            commit_block_start(model, cache, state, finished, nfe, committed, first=b == 0)
        sampler.begin_block(state)
        budget = sampler.step_budget(Lb)
        while True:
            active = ~finished & sampler.block_continues(state, (state.x[:, state.block] == mask_id).any(-1))
            if not bool(active.any()):
                break
            if state.step_in_block >= budget:
                rows = active.nonzero().flatten().tolist()
                raise RuntimeError(
                    f"block {b} (columns {state.block.start}-{state.block.stop} of the canvas) is still undecided "
                    f"after {state.step_in_block} forward passes (step {state.step} of this call) in rows {rows}: "
                    f"strategy {sampler.name!r} with cache={cache.name!r} committed nothing that finishes it "
                    f"(the strategy's budget is {budget} passes per block); this is a bug in the strategy or cache"
                )
            state.active = active
            span = state.block if sampler.logits_span == "block" else slice(P, state.x.shape[1])
            # A shifted model reads column t from row t - 1; column 0 (a prompt token of a block-aligned canvas
            # whose prompts all fit in the first block, never a candidate) has no row left of it: zeros.
            lead = int(model.logit_shift > 0 and span.start == 0)
            result = sampler.forward(model, cache, state, slice(span.start + lead, span.stop))
            if lead:
                result = result.padded_left(lead, state.x.shape[1])
            state.fresh = result.fresh  # columns whose logits are this step's predictions (None = all)
            # (B, L, V): float32 for the block; the generation span stays in the model's dtype (see the docstring)
            logits = result.logits.float() if sampler.logits_span == "block" else result.logits
            out = sampler.step(logits, state)
            # Only masked positions of active rows can be committed; only decoded ones re-masked.
            cols = state.x[:, span]
            commit = out.commit & (cols == mask_id) & active[:, None]
            if state.fresh is not None:  # a cache skipped these columns: their logits are placeholders
                commit &= state.fresh[:, span]
            overwrite = None
            if out.overwrite is not None:  # set outright (no prediction), ahead of commit and remask
                overwrite = out.overwrite & active[:, None]
                commit &= ~overwrite
            new = torch.where(commit, out.tokens, cols)
            stamp = torch.where(commit, state.step, state.decoded_at[:, span])
            if out.revise is not None:  # token to token, only on columns this call decoded (never the prompt)
                over = out.revise & (cols != mask_id) & (out.tokens != mask_id) & \
                    (state.decoded_at[:, span] >= 0) & active[:, None]
                if state.fresh is not None:
                    over &= state.fresh[:, span]
                new = torch.where(over, out.tokens, new)
            if out.remask is not None:
                remask = out.remask & (cols != mask_id) & active[:, None] & ~commit
                if overwrite is not None:
                    remask &= ~overwrite
                new = torch.where(remask, mask_id, new)
                stamp = torch.where(remask, -1, stamp)
            if overwrite is not None:
                new = torch.where(overwrite, out.tokens, new)
                stamp = torch.where(overwrite & (cols == mask_id), state.step, stamp)  # a filled mask: decoded now
            state.x[:, span] = new
            state.decoded_at[:, span] = stamp
            committed += commit.sum(-1)
            nfe += active.long()
            state.step += 1
            state.step_in_block += 1
            if out.edit is not None:
                if not sampler.sizes_canvas:
                    raise RuntimeError(f"strategy {sampler.name!r} returned a canvas edit but does not declare "
                                       f"sizes_canvas")
                state.apply(out.edit)
                state.block = slice(start, min(start + Lb, state.x.shape[1]))
            cache.end_step(state, out)
            if not revises:  # a revokable or editing sampler may still change tokens before EOS
                finished |= finished_rows(answers(state.x), state.stop_token_ids, mask_id)
        if revises:
            finished |= finished_rows(answers(state.x), state.stop_token_ids, mask_id)
        if block_done is not None:
            finished |= block_done(answers(state.x), finished)
        if bool(finished.all()):
            break
        b += 1

    gen = answers(state.x)
    if answer_width is not None:
        gen_lengths = answer_width
    elif state.gen_lengths is not None:
        gen_lengths = state.gen_lengths
    else:
        gen_lengths = torch.full((B,), gen.shape[1], dtype=torch.long, device=device)
    decoded_at = state.decoded_at[:, P:] if answer_start is None else \
        answer_columns(state.decoded_at[:, P:], answer_start, answer_width, fill=-1)
    return GenerationOutput(tokens=gen, nfe=nfe, committed=committed,
                            answer_length=torch.minimum(first_stop(gen, state.stop_token_ids), gen_lengths),
                            decoded_at=decoded_at, steps=state.step, gen_lengths=gen_lengths)


def commit_block_start(model: DiffusionLM, cache: Cache, state: DecodeState, finished: torch.Tensor,
                       nfe: torch.Tensor, committed: torch.Tensor, *, first: bool) -> None:
    """Fast-dLLM v2's block start (Wu et al., arXiv:2509.26328; NVlabs/Fast-dLLM ``v2/generation_functions.py``,
    ``batch_sample``): once a block is decoded the release makes one pass over it that stores its K/V, and commits
    the argmax of that pass's last row as the first token of the next block (greedy whatever the temperature; the
    prefill of the prompt's full blocks does the same for a prompt that ends on a block boundary).

    ``state.block`` starts an attention block (column c); the cache runs the pass (``Cache.block_start_logits``:
    the logits of column c, from row c - 1), and every unfinished row whose column c is masked takes its argmax,
    counting one forward pass. ``first``: the generation's first block, where only rows whose prompt fills whole
    blocks have a mask there (the others start it with their prompt tail); without any such row there is no pass.
    One host read then (is there such a row?), none otherwise.
    """
    c = state.block.start
    need = ~finished & (state.x[:, c] == state.mask_token_id)  # (B,)
    if first and not bool(need.any()):
        return
    state.active = need
    token = cache.block_start_logits(model, state, c).argmax(-1)  # (B,)
    state.x[:, c] = torch.where(need, token, state.x[:, c])
    state.decoded_at[:, c] = torch.where(need, state.step, state.decoded_at[:, c])
    committed += need.long()
    nfe += need.long()
    state.step += 1


def check_block_causal(block_size: Optional[int], sampler: Sampler | type[Sampler], cache: Cache | type[Cache],
                       block_length: Optional[int]) -> None:
    """Raise ValueError, before any model work, for a setting a block-causal model (``ModelArgs.block_size``)
    cannot decode: a block length that does not divide the trained block size (the attention's blocks are the
    model's; a smaller decode block is a sub-block of one, as Fast-dLLM v2 decodes),
    a strategy that reads logits past the current block, grows the canvas or runs extra rows, and a cache built
    on full attention (``Cache.block_causal``)."""
    if block_size is None:
        if cache.needs_block_causal:
            raise ValueError(f"cache={cache.name!r} serves block-causal (block-diffusion) models only "
                             f"({block_causal_families()}); "
                             f"this model attends bidirectionally: use cache=none, prefix, dual, ...")
        return
    if block_length is not None and (block_length > block_size or block_size % block_length):
        raise ValueError(
            f"block_length={block_length} does not divide the model's block size {block_size} (config.json "
            f"block_size): a block-diffusion model attends block-causally over blocks of {block_size}, and a decode "
            f"block must lie inside one of them; give block_length={block_size} (the default) or a divisor of it "
            f"(use a checkpoint trained with larger blocks, e.g. an SDAR -b8 ... -b64 variant, for larger ones)"
        )
    why = None
    if sampler.logits_span != "block":
        why = "reads logits past the current block (logits_span='generation'), which a block-causal model computes " \
              "only from the blocks to their left"
    elif sampler.sizes_canvas or sampler.cache_needs & {"extra_rows", "resize"}:
        why = "changes the canvas or runs extra rows (" + ", ".join(sorted(sampler.cache_needs)) + ")"
    if why:
        raise ValueError(f"strategy {sampler.name!r} cannot decode a block-causal (block-diffusion) model: it {why}")
    if cache.block_causal is not True:
        raise ValueError(f"cache={cache.name!r} cannot serve a block-causal (block-diffusion) model: "
                         f"{cache.block_causal}. Use cache=block (exact: finished blocks' K/V are final) or none.")


def block_aligned_canvas(prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor], gen_length: int,
                         block_size: int, mask_id: int, fill_id: int, *, greedy_block_start: bool = False):
    """The canvas of a block-causal model (block diffusion, SDAR arXiv:2510.06303, ``block_diffusion_generate``).

    The release lays one prompt of length L at positions 0..L-1 of ``ceil((L + gen_length) / bs) * bs``
    columns, blocks counted from position 0; the block holding the prompt's last ``L mod bs`` tokens is the first
    one decoded, its prompt tokens kept. For a batch, row i is left-padded by ``p_i = bs * (Kmax - L_i // bs)``
    (``Kmax`` = the most full prompt blocks of any row), so every row's blocks are canvas blocks (column // bs)
    and every row's prompt tail starts canvas block ``Kmax``; columns past a row's end hold ``fill_id`` and are
    hidden from attention. RoPE positions are ``column - p_i``: each row sees exactly what it sees alone.

    ``greedy_block_start`` (Fast-dLLM v2's ``batch_sample``): the release decodes ``gen_length / bs`` blocks from
    the one holding the prompt's tail, ``L // bs * bs + gen_length`` columns, then commits one more token (the
    first of the next block): each row's canvas is ``L // bs * bs + gen_length + 1`` columns.

    Args:
        prompt_ids (`torch.LongTensor` of shape `(B, P)`): left-padded prompts; prompt_mask (B, P) bool or None.
    Returns:
        x (B, T), attention_mask (B, T) bool, position_ids (B, T), the first generation column ``bs * Kmax``,
        answer_start (B,) (= ``L_i mod bs``, generation-relative) and answer_width (B,) (each row's masks:
        ``ceil((L_i + G) / bs) * bs - L_i``). One host read (Kmax and the canvas width).
    """
    B, P = prompt_ids.shape
    device, bs = prompt_ids.device, block_size
    lengths = torch.full((B,), P, dtype=torch.long, device=device) if prompt_mask is None else \
        prompt_mask.to(device=device, dtype=torch.long).sum(-1)
    full, tail = lengths // bs, lengths % bs
    k_max, ragged = torch.stack([full.max(), (tail > 0).any().long()]).tolist()  # the one host read
    start = bs * k_max
    pad = bs * (k_max - full)  # (B,)
    if greedy_block_start:
        T = start + gen_length + 1
        total = bs * full + gen_length + 1  # (B,) row-relative
    else:
        T = start + gen_length + bs * ragged
        total = bs * (full + (tail > 0).long()) + gen_length  # (B,) = ceil((L + G) / bs) * bs, row-relative
    rel = torch.arange(T, device=device)[None, :] - pad[:, None]  # (B, T) row-relative position
    src = (P - lengths[:, None] + rel).clamp(0, P - 1)
    x = torch.where(rel < lengths[:, None], prompt_ids.gather(1, src), mask_id)
    inside = (rel >= 0) & (rel < total[:, None])
    x = torch.where(inside, x, fill_id)
    return x, inside, rel.clamp(min=0), start, tail, total - lengths


def answer_columns(gen: torch.Tensor, start: torch.Tensor, width: torch.Tensor, *, fill: int) -> torch.Tensor:
    """gen (B, W), start (B,), width (B,) -> (B, W): row i's columns ``[start_i, start_i + width_i)``
    left-aligned, ``fill`` after them (the width stays W: no host read)."""
    W = int(gen.shape[1])
    col = torch.arange(W, device=gen.device)[None, :]
    src = (start[:, None] + col).clamp(max=W - 1)
    return torch.where(col < width[:, None], gen.gather(1, src), fill)
