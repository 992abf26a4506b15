"""dKV-Cache (lmeval_dllm/caches/dkv.py): the rows each step runs, from the record of when every column was
decoded (the one-step delay, refreshes, the LLaDA and Dream block starts, prefill's and pd's pinned prompt), the
exact setting (refresh every step = no cache), that the other settings do approximate, a batch = each prompt alone
for every variant, the refused strategies and the parameter errors."""

from __future__ import annotations

import pytest
import torch
from caches_support import PROMPTS, decode, decode_logged, left_pad, tiny

from lmeval_dllm.caches import CACHES, build_cache, check_compatible
from lmeval_dllm.samplers import SAMPLERS


def logged(model, ids, mask, gen_length=16, block_length=4, mode=None, **cache_kw):
    """Decode through dkv; return the output and, per step, the sorted canvas rows layer 0 ran (dummies left out)."""
    cache = build_cache("dkv", **cache_kw)
    runs = []
    update = cache.update
    T = ids.shape[1] + gen_length

    def logging_update(layer_idx, input_pos, k, v):
        if layer_idx == 0:
            runs.append([sorted(p for p in row if p < T) for row in input_pos.tolist()])
        return update(layer_idx, input_pos, k, v)

    cache.update = logging_update
    out = decode(model, ids, mask, cache, gen_length=gen_length, block_length=block_length,
                 **(mode or {"num_transfer_tokens": 1}))
    return out, runs


def prompt_ids(tok, i=0):
    return torch.tensor([tok(PROMPTS[i], add_special_tokens=False).input_ids])


@pytest.mark.parametrize("R", [1, 3, 8])
def test_llada_decode_runs_masks_and_the_tokens_decoded_one_step_ago(llada_dir, R):
    """Block-local step n runs every row when n % R == 0 (refresh) or n == 1 (LLaDA's release starts a block with
    no cache), else the rows not decoded by the end of step s - 2: the masks and the tokens decoded at step
    s - 1."""
    model, tok = tiny(llada_dir)
    ids = prompt_ids(tok)
    P, T = ids.shape[1], ids.shape[1] + 16
    out, runs = logged(model, ids, None, cache_reloading_step=R)
    decoded_at = out.decoded_at[0].tolist()  # (G,) the step that committed each column
    assert len(runs) == out.steps == 16
    cached_steps = 0
    for s, rows in enumerate(runs):
        n = s % 4  # one token per step, blocks of 4: four steps a block
        if n % R == 0 or n == 1:
            assert rows == [list(range(T))], s
        else:
            assert rows == [[P + g for g in range(16) if decoded_at[g] >= s - 1]], s
            cached_steps += 1
    assert cached_steps == {1: 0, 3: 4, 8: 8}[R]


def test_dream_decode_runs_the_rows_whose_column_is_not_decoded(dream_dir):
    """Dream's row p predicts column p + 1 (shift_type=un): a cached step runs the rows whose column was not
    decoded by the end of step s - 2; the block's second step reads the rows whose column was decoded at the block
    start (Dream's release), so it runs from the last prompt row on; the last row is cached from then on."""
    model, tok = tiny(dream_dir)
    ids = prompt_ids(tok)
    P, T = ids.shape[1], ids.shape[1] + 16
    out, runs = logged(model, ids, None, block_length=16, cache_reloading_step=8)
    decoded_at = out.decoded_at[0].tolist()
    assert len(runs) == 16
    for s, rows in enumerate(runs):
        if s % 8 == 0:
            assert rows == [list(range(T))], s
        elif s % 8 == 1 and s == 1:
            assert rows == [list(range(P - 1, T))], s
        else:
            expect = [p for p in range(P - 1, T - 1) if decoded_at[p + 1 - P] >= s - 1]
            assert rows == [expect], s


def test_dream_un_right(dream_dir):
    """un_right: row p counts as decoded once its token and its column's are (the last row: as the row before
    it). The first cached set (block start) is the release's, whatever shift_type."""
    model, tok = tiny(dream_dir)
    ids = prompt_ids(tok)
    P, T = ids.shape[1], ids.shape[1] + 16
    out, runs = logged(model, ids, None, block_length=16, cache_reloading_step=16, shift_type="un_right",
                       mode={"num_transfer_tokens": 2})
    decoded_at = out.decoded_at[0].tolist()

    def col(p):
        return decoded_at[p - P] if p >= P else -1  # the prompt counts as decoded before step 0

    def run(p, s):  # row p runs at step s unless tokens p and p + 1 were both decoded by step s - 2
        return col(p) >= s - 1 or col(p + 1) >= s - 1

    assert len(runs) == 8
    for s, rows in enumerate(runs):
        if s == 0:
            assert rows == [list(range(T))]
        elif s == 1:
            assert rows == [list(range(P - 1, T))]
        else:
            body = [p for p in range(T - 1) if run(p, s)]
            assert rows == [body + ([T - 1] if run(T - 2, s) else [])], s


def test_prefill_runs_the_prompt_once(tiny_dir):
    model, tok = tiny(tiny_dir)
    ids = prompt_ids(tok)
    P, T = ids.shape[1], ids.shape[1] + 16
    shift = model.logit_shift
    _, runs = logged(model, ids, None, variant="prefill")
    assert runs[0] == [list(range(T))]
    assert all(rows == [list(range(P - shift, T))] for rows in runs[1:])


def test_pd_keeps_the_prompt_and_delays_the_decoded_tokens(llada_dir):
    """pd: refreshes (and the block's second step) rerun everything but the prompt; cached steps run decode's
    rows."""
    model, tok = tiny(llada_dir)
    ids = prompt_ids(tok)
    P, T = ids.shape[1], ids.shape[1] + 16
    out, runs = logged(model, ids, None, variant="pd", cache_reloading_step=3)
    decoded_at = out.decoded_at[0].tolist()
    assert runs[0] == [list(range(T))]
    for s, rows in enumerate(runs[1:], start=1):
        n = s % 4
        if n % 3 == 0 or n == 1:
            assert rows == [list(range(P, T))], s
        else:
            assert rows == [[P + g for g in range(16) if decoded_at[g] >= s - 1]], s


def test_refresh_every_step_is_no_cache_and_the_default_approximates(tiny_dir):
    """cache_reloading_step=1: the no-cache tokens, NFE and logits. The default: every refresh step is exact on
    its canvas, and some cached step is not (else this test proves nothing)."""
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    ref, ref_logits, _ = decode_logged(model, ids, mask, None, gen_length=16, block_length=16, threshold=0.05)
    out, logits, _ = decode_logged(model, ids, mask, ("dkv", {"cache_reloading_step": 1}), gen_length=16,
                                   block_length=16, threshold=0.05)
    assert out.tokens.tolist() == ref.tokens.tolist() and out.nfe.tolist() == ref.nfe.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) < 1e-5
    out, logits, states = decode_logged(model, ids, mask, ("dkv", {"cache_reloading_step": 4}), gen_length=16,
                                        block_length=16, num_transfer_tokens=1)
    pad = torch.cat([mask, torch.ones(2, 16, dtype=torch.bool)], 1)
    pos = (pad.long().cumsum(-1) - 1).clamp(min=0)
    err = []
    for s, (x, block) in enumerate(states):
        masked = (x[:, block] == model.mask_token_id)[..., None]  # the columns a strategy reads
        exact = model.predict(x, pos, block, attention_mask=pad).float()
        err.append(((logits[s] - exact) * masked).abs().max().item())
    assert len(err) == 16 and max(err[0::4]) < 1e-5
    assert max(err) > 1e-3


@pytest.mark.parametrize("kw", [{}, {"cache_reloading_step": 2}, {"variant": "prefill"}, {"variant": "pd"},
                                {"shift_type": "un_right"}])
@pytest.mark.parametrize("mode", [{"threshold": 0.05}, {"num_transfer_tokens": 2}])
def test_batch_equals_each_prompt_alone(tiny_dir, kw, mode):
    """Rows need different step counts per block (threshold mode), so their delayed sets and refresh counts
    differ within the batch; padding rows are never run."""
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    batch = decode(model, ids, mask, ("dkv", kw), gen_length=16, block_length=8, **mode)
    assert (batch.tokens != model.mask_token_id).all()
    for i, e in enumerate(enc):
        alone = decode(model, torch.tensor([e]), None, ("dkv", kw), gen_length=16, block_length=8, **mode)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), (i, PROMPTS[i])
        assert alone.nfe[0] == batch.nfe[i]


def test_composition_with_every_strategy():
    """Every strategy runs with dkv except WINO (extra rows) and DAEDAL (canvas growth), refused with the reason."""
    refused = {
        "wino": r"strategy 'wino' cannot be used with cache='dkv': the strategy runs rows that are not part of the "
                r"canvas .*, and dkv chooses its own query rows among canvas positions",
        "daedal": r"strategy 'daedal' cannot be used with cache='dkv': the strategy changes the canvas length "
                  r"while decoding .*, and dkv's cached sets and K/V are stored by canvas position",
    }
    for name, strategy in SAMPLERS.items():
        if name in refused:
            with pytest.raises(ValueError, match=refused[name]):
                check_compatible(strategy, CACHES["dkv"])
        else:
            check_compatible(strategy, CACHES["dkv"])


@pytest.mark.parametrize("kw,msg", [
    ({"variant": "decoded"}, r"^variant must be one of decode, prefill, pd, got 'decoded'$"),
    ({"variant": "greedy"}, r"^variant='greedy' \(dKV-Cache-Greedy\) is not supported: .* Use one of decode, "
                            r"prefill, pd$"),
    ({"cache_reloading_step": 0}, r"^cache_reloading_step must be an integer >= 1, got 0$"),
    ({"shift_type": "left"}, r"^shift_type must be one of un, un_right, got 'left'$"),
    ({"shift_type": "right"}, r"^shift_type='right' is not supported: .* Use un or un_right$"),
    ({"cache_steps": 4}, r"unknown parameter 'cache_steps' for cache 'dkv'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        build_cache("dkv", **kw)


def test_defaults():
    cache = build_cache("dkv")
    assert (cache.variant, cache.cache_reloading_step, cache.shift_type) == ("decode", 8, "un")


def test_one_cache_object_serves_calls_of_any_shape(tiny_dir):
    """Per-call state is refilled in place when the shape repeats (graphs survive) and reallocated when it does
    not: a long-lived cache object gives what a fresh one gives, call after call."""
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    cache = build_cache("dkv", variant="pd", cache_reloading_step=3)
    runs = [(ids, mask), (torch.tensor([enc[1]]), None), (ids, mask), (torch.tensor([enc[2]]), None)]
    for x, m in runs:
        fresh = decode(model, x, m, ("dkv", {"variant": "pd", "cache_reloading_step": 3}), threshold=0.05)
        reused = decode(model, x, m, cache, threshold=0.05)
        assert reused.tokens.tolist() == fresh.tokens.tolist() and reused.nfe.tolist() == fresh.nfe.tolist()
