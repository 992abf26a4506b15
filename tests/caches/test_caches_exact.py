"""Invariants that tie every cache to the exact computation (no cache), on both tiny model families:

- forced to recompute everything at every step, a cache gives exactly the no-cache tokens (logits within 1e-5);
- the first step of every block (prefix, dual) and the first step of the call (dllm, d2cache) is a full forward:
  its logits equal the no-cache logits of the same canvas;
- one step per block (threshold 0, or block_length tokens per step) with the dual or prefix cache = no cache;
- the cached steps really run fewer rows (the counts below are exact).
"""

from __future__ import annotations

import pytest
import torch
from caches_support import EXACT, PROMPTS, decode, decode_logged, left_pad, tiny

from lmeval_dllm.caches import build_cache


@pytest.mark.parametrize("name", sorted(EXACT))
def test_refresh_at_every_step_is_the_exact_computation(tiny_dir, name):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    ref, ref_logits, _ = decode_logged(model, ids, mask, None, gen_length=16, block_length=8, threshold=0.05)
    fresh = []  # elastic returns real logits for its decoding window only (the block's masks here)
    out, logits, _ = decode_logged(model, ids, mask, (name, EXACT[name]), gen_length=16, block_length=8,
                                   threshold=0.05, on_fresh=fresh.append)
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert out.nfe.tolist() == ref.nfe.tolist() and len(logits) == len(ref_logits)
    assert max(((a - b) * f[..., None]).abs().max().item() for a, b, f in zip(logits, ref_logits, fresh)) < 1e-5


@pytest.mark.parametrize("name", ["prefix", "dual"])
def test_first_step_of_every_block_is_a_full_forward(tiny_dir, name):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    out, logits, states = decode_logged(model, ids, mask, (name, {}), gen_length=24, block_length=8)
    starts = [i for i, (_, block) in enumerate(states) if i == 0 or block != states[i - 1][1]]
    assert len(starts) == 3  # one per block
    pad = torch.cat([mask, torch.ones(2, 24, dtype=torch.bool)], 1)
    pos = (pad.long().cumsum(-1) - 1).clamp(min=0)
    for i in starts:
        x, block = states[i]
        exact = model.predict(x, pos, block, attention_mask=pad).float()
        assert (logits[i] - exact).abs().max().item() < 1e-5, f"step {i}"
    # ... and the other steps are not (the cache approximates), else this test proves nothing
    x, block = states[starts[1] + 3]
    assert (logits[starts[1] + 3] - model.predict(x, pos, block, attention_mask=pad).float()).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["dllm", "d2cache"])
def test_first_step_is_a_full_forward(tiny_dir, name):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    _, ref_logits, _ = decode_logged(model, ids, mask, None, gen_length=16, block_length=8)
    _, logits, _ = decode_logged(model, ids, mask, (name, {}), gen_length=16, block_length=8)
    assert (logits[0] - ref_logits[0]).abs().max().item() < 1e-5
    assert (logits[3] - ref_logits[3]).abs().max().item() > 1e-3  # later steps are approximate


@pytest.mark.parametrize("name", ["prefix", "dual"])
@pytest.mark.parametrize("one_step", [{"threshold": 0.0}, {"num_transfer_tokens": 8}])
def test_one_step_per_block_equals_no_cache(tiny_dir, name, one_step):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    ref = decode(model, ids, mask, None, gen_length=16, block_length=8, **one_step)
    out = decode(model, ids, mask, (name, {}), gen_length=16, block_length=8, **one_step)
    assert out.tokens.tolist() == ref.tokens.tolist() and out.steps == ref.steps == 2


def _rows_run(model):
    """Record how many canvas rows go through the embedding at each forward (prefix / dual run the model)."""
    seen = []
    model.tok_embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("name", ["prefix", "dual"])
def test_cached_steps_run_the_block_and_suffix_or_the_block(tiny_dir, name):
    from lmeval_dllm.models import load_model

    model = load_model(tiny_dir)  # a private copy: the hook stays on it
    _, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    seen = _rows_run(model)
    decode(model, ids, mask, (name, {}), gen_length=16, block_length=8, num_transfer_tokens=2)
    T, P, shift = ids.shape[1] + 16, ids.shape[1], model.logit_shift
    cached = [T - P + shift, T - P - 8 + shift] if name == "prefix" else [8 + shift, 8 + shift]
    assert seen == [T] + [cached[0]] * 3 + [T] + [cached[1]] * 3


def test_dllm_recomputes_the_scheduled_rows(tiny_dir):
    """kp=3, kr=2, rou=0.25 over 16 generated positions: layer 0 always runs every row; the other layers run
    prompt + response (step 0), the 4 least similar response rows (odd steps), the response (steps 2, 4), the
    prompt + response (step 6: 6 % 3 == 0 and 6 % 2 == 0), prompt + 4 rows (step 3)."""
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:1])
    cache = build_cache("dllm", kp=3, kr=2, rou=0.25)
    runs = []
    for layer in model.layers:
        layer.qkv = (lambda f, i: lambda h, c, s: (runs.append((i, h.shape[1])), f(h, c, s))[1])(layer.qkv,
                                                                                                layer.layer_idx)
    try:
        decode(model, ids, mask, cache, gen_length=16, block_length=8, steps=8)
    finally:
        for layer in model.layers:
            del layer.qkv
    P, T = ids.shape[1], ids.shape[1] + 16
    per_step = [[n for i, n in runs[s * 2:(s + 1) * 2]] for s in range(8)]
    assert [s[0] for s in per_step] == [T] * 8  # layer 0: always everything
    assert [s[1] for s in per_step] == [T, 4, 16, P + 4, 16, 4, T, 4]


@pytest.mark.parametrize("name", sorted(EXACT))
def test_refresh_at_every_step_is_exact_with_partial_rope(name):
    """A bidirectional model whose RoPE rotates half of each head (LLaDA2's partial_rotary_factor, as a GPU run
    found: dkv sized its stored cos/sin by the head, not by the rotated dims): refreshed every step, each cache
    gives the no-cache tokens."""
    from lmeval_dllm.models import DiffusionLM, ModelArgs

    args = ModelArgs(family="llada", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                     vocab_size=128, rope_theta=10000.0, norm_eps=1e-6, qkv_bias=False, rope_fp32=False,
                     tie_embeddings=False, max_position=256, mask_token_id=120, eos_token_id=121,
                     pad_token_id=121, logit_shift=0, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    model = DiffusionLM(args, fuse=False)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        model.output.weight[args.mask_token_id].zero_()
    model.init_buffers(torch.device("cpu"))
    model.eval().requires_grad_(False)
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded row
    ref, _, _ = decode_logged(model, ids, mask, None, gen_length=16, block_length=8, threshold=0.05)
    out, _, _ = decode_logged(model, ids, mask, (name, EXACT[name]), gen_length=16, block_length=8, threshold=0.05)
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert out.nfe.tolist() == ref.nfe.tolist()
