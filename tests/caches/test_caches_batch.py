"""A left-padded batch decodes, token for token, what each prompt decodes alone, with every cache at its defaults
(the approximate, cached mode) and in every vanilla mode, on both model families.

With the threshold / factor rules rows need different numbers of steps per block, so rows of one batch are at
different points of the dLLM-Cache refresh schedule and have different d2Cache query sets: this is what the
per-row schedules and placeholder rows are for."""

from __future__ import annotations

import pytest
from caches_support import PROMPTS, decode_logged, left_pad, tiny

MODES = {"top-n": {"num_transfer_tokens": 2}, "steps": {"steps": 8}, "threshold": {"threshold": 0.05},
         "factor": {"factor": 3.0}}
CACHES = {"prefix": {}, "dual": {"refresh_interval": 3}, "dllm": {"kp": 3, "kr": 2, "rou": 0.25},
          "d2cache": {"current_k": 3, "inflate_w": 2}, "sparse": {"keep_ratio": 0.4},
          "elastic": {"window_length": 4, "gamma": 0.99, "track_num": 2},
          "dkv": {"cache_reloading_step": 3}}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(CACHES))
def test_batch_equals_each_prompt_alone(tiny_dir, name, mode):
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    stops = (tok.eos_token_id,)
    import torch

    active = []
    batch, logits, _ = decode_logged(model, ids, mask, (name, CACHES[name]), gen_length=16, block_length=8,
                                     stops=stops, on_active=active.append, **MODES[mode])
    for i, e in enumerate(enc):
        alone, alone_logits, _ = decode_logged(model, torch.tensor([e]), None, (name, CACHES[name]), gen_length=16,
                                               block_length=8, stops=stops, **MODES[mode])
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), f"row {i} ({PROMPTS[i]!r})"
        assert alone.nfe[0] == batch.nfe[i]
        # the row's logits at each step it decodes are those it gets alone (same refresh schedule, same rows)
        mine = [lg[i] for lg, on in zip(logits, active) if on[i]]
        assert max((a - b[0]).abs().max().item() for a, b in zip(mine, alone_logits)) < 1e-4
