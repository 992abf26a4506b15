"""Every cache with every score-based strategy besides vanilla (pc_sampler, eb_sampler, klass, ar), on both tiny
families. WINO and DAEDAL, which need more of a cache than the usual forward, have these tests in their own files.

- A cache forced to recompute everything at every step gives exactly the no-cache tokens and forward passes: the
  strategy reads the same logits, so any difference is a bug in how it uses ``state.fresh`` or the cache.
- With each cache's default (approximate) settings the generation completes: no mask is left in any row, every
  position is committed once, each row of the batch is token for token what its prompt gives alone through the
  same cache, and a strategy that commits a fixed count per step (ar) keeps its exact number of forward passes.
"""

from __future__ import annotations

import pytest
import torch
from caches_support import EXACT, PROMPTS, left_pad, tiny

from lmeval_dllm.caches import build_cache
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler

STRATEGIES = {
    "pc_sampler": {"debias": False, "lambd": 0.25},
    "eb_sampler": {"gamma": 0.5},
    "klass": {"threshold": 0.5, "kl_threshold": 0.05},
    "ar": {"num_transfer_tokens": 2},
}


def run(model, ids, mask, strategy, cache):
    sampler = build_sampler(strategy, Proposal.from_params(), **STRATEGIES[strategy])
    cache = build_cache(cache[0], **cache[1]) if cache is not None else None
    return generate(model, ids, mask, sampler, GenerationConfig(16, 8), stop_token_ids=torch.tensor([999]),
                    cache=cache)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_refresh_at_every_step_equals_no_cache(tiny_dir, strategy):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    ref = run(model, ids, mask, strategy, None)
    for name, exact in EXACT.items():
        out = run(model, ids, mask, strategy, (name, exact))
        assert out.tokens.tolist() == ref.tokens.tolist(), (strategy, name)
        assert out.nfe.tolist() == ref.nfe.tolist(), (strategy, name)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_default_caches_complete_the_generation(tiny_dir, strategy):
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    for name in EXACT:
        out = run(model, ids, mask, strategy, (name, {}))
        assert (out.tokens != model.mask_token_id).all(), (strategy, name)
        assert out.committed.tolist() == [16, 16, 16], (strategy, name)  # each position exactly once
        if strategy == "ar":  # two tokens per step, 16 positions: 8 passes whatever the cache serves
            assert out.nfe.tolist() == [8, 8, 8], name
        # approximate, but row by row: each row is exactly what its prompt decodes alone through the same cache
        for i, e in enumerate(enc):
            alone = run(model, torch.tensor([e]), None, strategy, (name, {}))
            assert alone.tokens[0].tolist() == out.tokens[i].tolist(), (strategy, name, i)
            assert alone.nfe[0] == out.nfe[i], (strategy, name, i)
