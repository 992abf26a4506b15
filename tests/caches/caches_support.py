"""Shared helpers of the cache tests (a plain module: test files import it, not conftest)."""

from __future__ import annotations

import torch
from batches import left_pad, tiny  # noqa: F401 - the cache tests import them from here

from lmeval_dllm.caches import build_cache
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]

# Settings under which each cache recomputes everything at every step (= the exact computation).
EXACT = {"prefix": {"refresh_interval": 1}, "dual": {"refresh_interval": 1}, "dllm": {"kp": 1, "kr": 1},
         "d2cache": {"refresh_interval": 1}, "vicinity": {"refresh_interval": 1},
         "sparse": {"delay_steps": 0, "refresh_interval": 1},
         "elastic": {"refresh_interval": 1},
         "dkv": {"cache_reloading_step": 1}}


def decode(model, ids, mask, cache=None, gen_length=16, block_length=8, stops=(999,), on_step=None, **sampler_kw):
    """Run ``generate`` with the vanilla strategy; ``on_step(logits, state)`` sees every step's logits."""
    sampler = build_sampler("vanilla", Proposal.from_params(), **sampler_kw)
    if on_step is not None:
        step = sampler.step

        def recording_step(logits, state):
            on_step(logits, state)
            return step(logits, state)

        sampler.step = recording_step
    cache = build_cache(cache[0], **cache[1]) if isinstance(cache, tuple) else cache
    return generate(model, ids, mask, sampler, GenerationConfig(gen_length, block_length),
                    stop_token_ids=torch.tensor(list(stops)), cache=cache)


def decode_logged(model, ids, mask, cache=None, on_active=None, on_fresh=None, **kw):
    """(output, [per-step logits of the active rows, zero elsewhere], [per-step (canvas, block) before the step]).

    Rows that do not decode in a step (their block is done while another row's is not) are left out: their logits
    are never read, and a cache may skip them. ``on_fresh`` gets each step's (B, L) bool: the block's columns
    whose logits are real predictions (``state.fresh``; all True without it)."""
    logits, states = [], []

    def log(lg, st):
        active = st.active if st.active is not None else torch.ones(lg.shape[0], dtype=torch.bool)
        logits.append(lg * active[:, None, None])
        states.append((st.x.clone(), st.block))
        if on_active is not None:
            on_active(active.tolist())
        if on_fresh is not None:
            span = slice(st.block.start, st.block.start + lg.shape[1])
            every = torch.ones(lg.shape[:2], dtype=torch.bool)
            on_fresh(st.fresh[:, span].clone() if st.fresh is not None else every)

    out = decode(model, ids, mask, cache, on_step=log, **kw)
    return out, logits, states
