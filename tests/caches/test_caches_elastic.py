"""Elastic-Cache (lmeval_dllm/caches/elastic.py): its parts against direct restatements (first positions, grouped
attention probabilities, the drift statistic, the most-attended positions), the decoding window (the first
``window_length`` masks, none right of the first committed stop token), which rows each layer runs (the tracked,
committed and window rows; the whole canvas from the layer after a drift), refresh = the exact computation, a batch
= each prompt alone while rows refresh at different layers, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from caches_support import PROMPTS, decode, decode_logged, left_pad, tiny

import lmeval_dllm.caches.elastic as el
from lmeval_dllm.caches import CACHES, build_cache, check_compatible
from lmeval_dllm.models import LayerHooks
from lmeval_dllm.samplers import SAMPLERS
from lmeval_dllm.tiny import write_checkpoint


@pytest.fixture(scope="module", params=["llada", "dream"])
def deep_dir(request, tmp_path_factory) -> str:
    """A 4-layer tiny checkpoint (the drift test needs layers to refresh after)."""
    layers = {"llada": {"n_layers": 4}, "dream": {"num_hidden_layers": 4}}[request.param]
    return write_checkpoint(str(tmp_path_factory.mktemp(f"deep-{request.param}")), request.param, seed=1,
                            **layers)


# -- the parts ------------------------------------------------------------------------------------------------


def test_first_true_lists_positions_then_placeholders():
    mask = torch.tensor([[False, True, False, True, True], [False, False, False, False, True]])
    pos, real = el.first_true(mask, 2)
    assert pos.tolist() == [[1, 3], [4, 0]] and real.tolist() == [[True, True], [True, False]]


def test_attention_probs_match_per_head_softmax():
    torch.manual_seed(0)
    B, Hq, Hkv, N, T, Dh = 2, 6, 2, 3, 7, 4
    q, k = torch.randn(B, Hq, N, Dh), torch.randn(B, Hkv, T, Dh)
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, :2] = False
    got = el.attention_probs(q, k, keys)
    for b in range(B):
        for h in range(Hq):
            s = q[b, h] @ k[b, h // 3].T / math.sqrt(Dh)
            ref = s.masked_fill(~keys[b], float("-inf")).softmax(-1)
            assert torch.allclose(got[b, h], ref, atol=1e-6)


def test_attention_similarity_is_the_mean_cosine_over_heads_of_real_rows_and_keys():
    # two heads, two tracked rows (the second a placeholder), three keys (the last one padding)
    past = torch.tensor([[[[1.0, 0.0, 5.0], [9.0, 9.0, 9.0]], [[0.0, 1.0, 5.0], [1.0, 2.0, 3.0]]]])  # (1, 2, 2, 3)
    now = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 1.0], [3.0, 2.0, 1.0]]]])
    rows, keys = torch.tensor([[True, False]]), torch.tensor([[True, True, False]])
    # key 0: heads (1, 0) vs (1, 0) -> 1; key 1: (0, 1) vs (1, 1) -> 1/sqrt(2)
    assert el.attention_similarity(past, now, rows, keys).item() == pytest.approx((1 + 2 ** -0.5) / 2)
    assert el.attention_similarity(now, now, torch.ones(1, 2, dtype=torch.bool), keys).item() == pytest.approx(1.0)


def test_one_product_over_every_row_gives_the_drift_and_the_tracked_positions_of_the_two_subsets():
    """drift_and_track (compiled on CUDA) = the drift statistic of the tracked rows and the tracked positions of the
    masked rows, each from its own attention product; past_attention gathers the stored queries first."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, Dh, n_track, rows_from = 2, 4, 2, 9, 8, 3, 5
    q, k = torch.randn(B, Hq, 8, Dh, generator=g), torch.randn(B, Hkv, T, Dh, generator=g)
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, :2] = False
    treal, mreal = torch.tensor([[True, True, False], [True, False, True]]), torch.ones(B, 3, dtype=torch.bool)
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[:, 6:] = True
    store = torch.randn(B, Hq, T + 1, Dh, generator=g)
    tcols = torch.tensor([[4, 0, 9], [2, 3, 5]])
    past = el.past_attention(store, tcols, k, keys)
    assert torch.equal(past, el.attention_probs(el.gather_heads(store, tcols), k, keys))
    sim, track = el.drift_and_track(q, k, keys, past, treal, mreal, masked, n_track, rows_from, 2)
    assert torch.equal(sim, el.attention_similarity(past, el.attention_probs(q[:, :, :n_track], k, keys), treal,
                                                    keys))
    want = el.most_attended(el.attention_probs(q[:, :, rows_from:], k, keys), mreal, masked, keys, 2)
    assert torch.equal(track, want) and track.shape == (B, 2)
    mrows = torch.tensor([[1, 2, 7], [0, 8, 8]])
    assert torch.equal(el.window_track(store[:, :, :T], mrows, k, keys, mreal, masked, 2),
                       el.most_attended(el.attention_probs(el.gather_heads(store[:, :, :T], mrows), k, keys), mreal,
                                        masked, keys, 2))


def test_most_attended_skips_masks_and_padding():
    probs = torch.zeros(1, 2, 2, 5)
    probs[0, 0, 0] = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    probs[0, 1, 1] = torch.tensor([0.0, 0.0, 0.4, 0.0, 0.0])
    probs[0, 1, 0] = torch.tensor([9.0, 9.0, 9.0, 9.0, 9.0])  # a placeholder row: not counted
    rows = torch.tensor([[True, False]])
    masked = torch.tensor([[False, False, False, True, False]])  # position 3 is masked: counts 0
    keys = torch.tensor([[False, True, True, True, True]])  # position 0 is padding: never chosen
    assert el.most_attended(probs, rows, masked, keys, 2).tolist() == [[1, 4]]
    rows = torch.tensor([[True, True]])  # the second row adds 0.4 to position 2
    assert el.most_attended(probs, rows, masked, keys, 1).tolist() == [[2]]


def test_the_model_passes_each_layer_input_through_the_hook(tiny_dir):
    model, tok = tiny(tiny_dir)
    seen = []

    class Doubler(LayerHooks):
        def layer_input(self, layer_idx, h):
            seen.append((layer_idx, tuple(h.shape)))
            return h * 2 if layer_idx == 0 else h

    ids = torch.tensor([tok("Hi there")["input_ids"]])
    pos = torch.arange(ids.shape[1])[None]
    out = model(ids, pos, None, Doubler())
    assert seen == [(i, (1, ids.shape[1], model.args.dim)) for i in range(model.args.n_layers)]
    h = model.tok_embeddings(ids) * 2
    cos, sin = model.rope(pos)
    for layer in model.layers:
        h = layer(h, cos, sin, None)
    assert torch.allclose(out, model.head(h), atol=1e-6)
    assert LayerHooks().layer_input(0, h) is h


# -- the decoding window --------------------------------------------------------------------------------------


def _fresh_log(model, ids, mask, cache_kw, **kw):
    fresh = []
    out, _, states = decode_logged(model, ids, mask, ("elastic", cache_kw), on_fresh=fresh.append, **kw)
    return out, fresh, states


def test_the_strategy_decodes_from_the_first_window_length_masks(tiny_dir):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS[:2])
    P = ids.shape[1]
    out, fresh, states = _fresh_log(model, ids, mask, {"window_length": 3}, gen_length=16, block_length=16,
                                    threshold=0.3)
    for f, (x, _) in zip(fresh, states):
        masked = x[:, P:] == model.mask_token_id
        first3 = masked & (masked.long().cumsum(-1) <= 3)
        assert f.tolist() == first3.tolist()
    # window 1, one token per step: strictly left to right
    out = decode(model, ids, mask, ("elastic", {"window_length": 1}), gen_length=16, block_length=16,
                 num_transfer_tokens=2)
    assert out.decoded_at.tolist() == [list(range(16))] * 2 and out.nfe.tolist() == [16, 16]


def test_masks_right_of_the_first_committed_stop_leave_the_window(tiny_dir):
    """After the first stop token is committed at column c, no column right of c is ever in the window again (the
    release drops those masks); without that stop token they would have been."""
    model, tok = tiny(tiny_dir)
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    kw = dict(gen_length=16, block_length=16, threshold=0.3)
    ref, ref_fresh, _ = _fresh_log(model, ids, None, {"window_length": 4}, **kw)  # stop 999: never committed
    at, tokens = ref.decoded_at[0], ref.tokens[0]
    found = None
    for t in tokens.unique().tolist():  # a token whose first commit leaves masks on both sides of it
        s = int(at[tokens == t].min())
        c = int(((tokens == t) & (at == s)).int().argmax())
        if (at[:c] > s).any() and any(f[0, c + 1:].any() for f in ref_fresh[s + 1:]):
            found = (t, s, c)
            break
    assert found is not None
    t, s, c = found
    out, fresh, _ = _fresh_log(model, ids, None, {"window_length": 4}, stops=(t,), **kw)
    assert len(fresh) > s + 1  # it decodes on after the stop token
    assert all(not f[0, c + 1:].any() for f in fresh[s + 1:])
    assert [f.tolist() for f in fresh[:s + 1]] == [f.tolist() for f in ref_fresh[:s + 1]]


# -- which rows run -------------------------------------------------------------------------------------------


def _rows_per_layer(model, run):
    """Run ``run()`` and return, per forward pass, the rows each layer computed ([(layer, rows), ...] per pass)."""
    calls = []
    for layer in model.layers:
        layer.qkv = (lambda f, i: lambda h, c, s: (calls.append((i, h.shape[1])), f(h, c, s))[1])(layer.qkv,
                                                                                                 layer.layer_idx)
    try:
        out = run()
    finally:
        for layer in model.layers:
            del layer.qkv
    return out, calls


def test_a_drift_refreshes_every_layer_after_it_for_the_whole_canvas(deep_dir, monkeypatch):
    """Drift statistics scripted per cached pass: pass 2 drifts at layer 1 (layers 2 and 3 then rerun the whole
    canvas), pass 4 at layer 3 (no layer after it), the others never. Every pass after the first runs the tracked,
    committed and window slots (4 layers x 1 + 4 + 4 = 12 rows) through every layer."""
    model, tok = tiny(deep_dir)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    T, script, at = ids.shape[1] + 16, {2: 1, 4: 3}, {"pass": -1, "layer": 0}

    def scripted(past, now, rows, keys):
        drift = script.get(at["pass"]) == at["layer"]
        at["layer"] += 1
        return torch.full((past.shape[0],), 0.0 if drift else 2.0)

    monkeypatch.setattr(el, "attention_similarity", scripted)
    cache = build_cache("elastic", window_length=4)
    rows_fn = cache._rows

    def counted(*a, **k):
        at["pass"], at["layer"] = at["pass"] + 1, 0
        return rows_fn(*a, **k)

    cache._rows = counted
    out, calls = _rows_per_layer(model, lambda: decode(model, ids, None, cache, gen_length=16, block_length=16,
                                                       num_transfer_tokens=1))
    expect = [(i, T) for i in range(4)]  # the first pass: the whole canvas
    for n in range(out.steps - 1):
        expect += [(i, 12) for i in range(4)] + ([(2, T), (3, T)] if n == 2 else [])
    assert out.steps == 16 and calls == expect


def test_no_drift_keeps_the_cache_and_a_drift_everywhere_refreshes_after_layer_0(deep_dir):
    model, tok = tiny(deep_dir)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    T, L = ids.shape[1] + 16, 4
    M = L + 2 * 4
    run = lambda g: decode(model, ids, None, ("elastic", {"window_length": 4, "gamma": g}), gen_length=16,  # noqa
                           block_length=16, num_transfer_tokens=1)
    out, calls = _rows_per_layer(model, lambda: run(0.0))  # a cosine similarity is never below 0
    assert calls == [(i, T) for i in range(L)] + [(i, M) for i in range(L)] * (out.steps - 1)
    out, calls = _rows_per_layer(model, lambda: run(1.0))  # ... and (here) never exactly 1
    assert calls == [(i, T) for i in range(L)] + ([(i, M) for i in range(L)] + [(i, T) for i in range(1, L)]) * (
        out.steps - 1)


def test_refresh_every_pass_is_the_exact_computation(deep_dir):
    """refresh_interval=1 with a window covering the block and no stop token: the no-cache tokens and logits."""
    model, tok = tiny(deep_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    ref, ref_logits, _ = decode_logged(model, ids, mask, None, gen_length=16, block_length=8, threshold=0.2)
    fresh = []
    out, logits, _ = decode_logged(model, ids, mask, ("elastic", {"refresh_interval": 1, "window_length": 8}),
                                   gen_length=16, block_length=8, threshold=0.2, on_fresh=fresh.append)
    assert out.tokens.tolist() == ref.tokens.tolist() and out.nfe.tolist() == ref.nfe.tolist()
    assert max(((a - b) * f[..., None]).abs().max().item() for a, b, f in zip(logits, ref_logits, fresh)) < 1e-5


def test_a_batch_equals_each_prompt_alone_while_rows_refresh_at_different_layers(deep_dir):
    model, tok = tiny(deep_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    stops = (tok.eos_token_id,)
    kw = {"window_length": 4, "gamma": 0.995, "track_num": 2}
    cache = build_cache("elastic", **kw)
    starts = []  # per cached pass: the refresh start layer of each active row
    rows_fn = cache._rows

    def logged(model_, x, active, *rest):
        out = rows_fn(model_, x, active, *rest)
        starts.append(out[2][active].tolist())
        return out

    cache._rows = logged
    batch = decode(model, ids, mask, cache, gen_length=16, block_length=8, threshold=0.3, stops=stops)
    L = model.args.n_layers
    assert any(len(set(s)) > 1 for s in starts)  # rows of one pass refresh from different layers ...
    assert any(0 < v < L for s in starts for v in s)  # ... some from mid-stack
    for i, e in enumerate(enc):
        alone = decode(model, torch.tensor([e]), None, ("elastic", kw), gen_length=16, block_length=8,
                       threshold=0.3, stops=stops)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), i
        assert alone.nfe[0] == batch.nfe[i], i


def test_without_block_caching_every_masked_row_runs(tiny_dir):
    model, tok = tiny(tiny_dir)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    T, L = ids.shape[1] + 16, model.args.n_layers
    out, calls = _rows_per_layer(model, lambda: decode(
        model, ids, None, ("elastic", {"window_length": 4, "gamma": 0.0, "block_caching": False}), gen_length=16,
        block_length=16, num_transfer_tokens=1))
    assert calls == [(i, T) for i in range(L)] + [(i, min(L, T) + 4 + 16) for i in range(L)] * (out.steps - 1)


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    ({"window_length": 0}, "window_length must be an integer >= 1, got 0"),
    ({"gamma": 1.5}, r"gamma must be in [0, 1] (a cosine similarity), got 1.5"),
    ({"gamma": float("nan")}, r"gamma must be in [0, 1] (a cosine similarity), got nan"),
    ({"track_num": 0}, "track_num must be an integer >= 1, got 0"),
    ({"refresh_interval": 0}, r"refresh_interval must be an integer >= 1 (or None), got 0"),
    ({"window_size": 8}, "unknown parameter 'window_size' for cache 'elastic'"),
])
def test_parameters_are_checked(kw, message):
    with pytest.raises(ValueError) as e:
        build_cache("elastic", **kw)
    assert str(e.value).startswith(message)


def test_defaults_are_the_release_defaults():
    c = build_cache("elastic")
    assert (c.window_length, c.gamma, c.track_num, c.block_caching, c.refresh_interval) == (16, 0.9, 1, True, None)


def test_wino_daedal_and_token_editing_are_refused_before_any_model_work():
    with pytest.raises(ValueError, match=r"^strategy 'wino' cannot be used with cache='elastic': the strategy runs "
                                         r"rows .* and elastic chooses its own query rows"):
        check_compatible(SAMPLERS["wino"], CACHES["elastic"])
    with pytest.raises(ValueError, match=r"^strategy 'daedal' cannot be used with cache='elastic': .* and "
                                         r"elastic's K/V, queries, hidden states and tracked positions are stored"):
        check_compatible(SAMPLERS["daedal"], CACHES["elastic"])
    with pytest.raises(ValueError, match=r"^strategy 'llada21_edit' cannot be used with cache='elastic': .* and "
                                         r"elastic returns logits for its window of masks only"):
        check_compatible(SAMPLERS["llada21_edit"], CACHES["elastic"])
    for name in sorted(set(SAMPLERS) - {"wino", "daedal", "llada21_edit"}):
        check_compatible(SAMPLERS[name], CACHES["elastic"])
