"""WinoSampler (lmeval_dllm/samplers/wino.py): the step on hand-built logits, the shadow block, a scripted decode
with a known re-mask, the invariants on the tiny checkpoints, and the lm_eval command line."""

from __future__ import annotations

import math

import pytest
import torch
from batches import left_pad
from scripted import logit_rows

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.state import DecodeState
from lmeval_dllm.samplers.wino import WinoSampler, shadow_rows, token_probability

V, MASK, EOS = 32, 31, 30
NEVER = torch.tensor([10**6])  # a stop token that never occurs: decode every block


def block_state(rows, prompt=(1, 2)):
    """A state whose canvas is prompt + one block per row, with WINO's per-block memory initialised."""
    x = torch.tensor([list(prompt) + r for r in rows])
    s = DecodeState(x=x, position_ids=torch.arange(x.shape[1]).expand(len(rows), -1), attention_mask=None,
                    prompt_len=len(prompt), mask_token_id=MASK, stop_token_ids=torch.tensor([EOS]))
    s.block = slice(len(prompt), x.shape[1])
    s.active = torch.ones(len(rows), dtype=torch.bool)
    return s


def wino(**kw) -> WinoSampler:
    return build_sampler("wino", Proposal.from_params(), **kw)


# --- the step on hand-built logits -----------------------------------------------------------------------------


def test_wide_in_commits_above_threshold_up_to_the_cap():
    s, sampler = block_state([[MASK] * 8]), wino(wide_in_thres=0.6)
    sampler.begin_block(s)
    conf = [0.95, 0.9, 0.61, 0.99, 0.7, 0.8, 0.55, 0.3]  # 6 above 0.6; cap = clamp(floor(0.7 * 8), 5, 20) = 5
    main = logit_rows(conf, range(10, 18))
    out = sampler.step(torch.cat([main, main])[None], s)
    assert out.commit[0].tolist() == [True, True, False, True, True, True, False, False]  # the 5 best of the 6
    assert out.tokens[0, out.commit[0]].tolist() == [10, 11, 13, 14, 15]
    assert not out.remask.any()
    assert s.sampler_state["prev_accept"].tolist() == [5]


def test_wide_in_falls_back_to_the_most_confident_n():
    s, sampler = block_state([[MASK] * 6]), wino(wide_in_thres=0.9, num_transfer_tokens=2)
    sampler.begin_block(s)
    main = logit_rows([0.5, 0.7, 0.2, 0.6, 0.1, 0.65], range(10, 16))
    out = sampler.step(torch.cat([main, main])[None], s)
    assert out.commit[0].tolist() == [False, True, False, False, False, True]


def _verify_step(prev_accept, drafts_above, n=1):
    """Block of 8: four decoded tokens with leave-one-out probabilities [0.5, 0.95, 0.2, 0.3, 0.2 (shadow of the
    fifth decoded, at 0.89)] and masks, ``drafts_above`` of them above the wide-in threshold."""
    rows = [[20, 21, 22, 23, 24, MASK, MASK, MASK]]
    s, sampler = block_state(rows), wino(wide_in_thres=0.6, narrow_out_thres=0.9, num_transfer_tokens=n)
    sampler.begin_block(s)
    s.sampler_state["prev_accept"] = torch.tensor([prev_accept])
    main_conf = [0.1] * 5 + [0.95 if i < drafts_above else 0.1 for i in range(3)]
    main = logit_rows(main_conf, range(10, 18))
    shadow = logit_rows([0.5, 0.95, 0.2, 0.3, 0.89, 0.5, 0.5, 0.5], [20, 21, 22, 23, 24, 0, 0, 0])
    return sampler.step(torch.cat([main, shadow])[None], s)


def test_narrow_out_remasks_the_least_confident_within_the_previous_accept_budget():
    out = _verify_step(prev_accept=3, drafts_above=2)  # accepts 2 > 1: budget = 3 - 1 = 2
    assert out.commit[0].tolist() == [False] * 5 + [True, True, False]
    assert out.remask[0].tolist() == [False, False, True, True, False, False, False, False]  # 0.2 and 0.3
    out = _verify_step(prev_accept=30, drafts_above=2)  # budget 29: every suspicious token (< 0.9)
    assert out.remask[0].tolist() == [True, False, True, True, True, False, False, False]


def test_a_step_accepting_exactly_n_never_remasks():
    for n in (1, 2):
        out = _verify_step(prev_accept=30, drafts_above=n, n=n)
        assert int(out.commit.sum()) == n and not out.remask.any()
    out = _verify_step(prev_accept=2, drafts_above=3, n=2)  # accepts 3 > 2, budget 2 - 2 = 0
    assert int(out.commit.sum()) == 3 and not out.remask.any()


def test_rows_of_a_batch_are_decided_independently():
    rows = [[20, 21, MASK, MASK, MASK, MASK], [MASK] * 6]
    s, sampler = block_state(rows), wino()
    sampler.begin_block(s)
    s.sampler_state["prev_accept"] = torch.tensor([4, 30])
    s.active = torch.tensor([True, True])
    main = torch.stack([logit_rows([0.1, 0.1, 0.9, 0.9, 0.2, 0.1], range(10, 16)),
                        logit_rows([0.9, 0.2, 0.2, 0.2, 0.2, 0.2], range(10, 16))])
    shadow = torch.stack([logit_rows([0.3, 0.5] + [0.5] * 4, [20, 21, 0, 0, 0, 0]), logit_rows([0.5] * 6, [0] * 6)])
    out = sampler.step(torch.cat([main, shadow], 1), s)
    assert out.commit.tolist() == [[False, False, True, True, False, False], [True, False, False, False, False, False]]
    assert out.remask.tolist() == [[True, True, False, False, False, False], [False] * 6]
    assert s.sampler_state["prev_accept"].tolist() == [2, 1]


def test_sigma_scales_the_wide_in_score_by_the_certainty_density():
    """Block = the whole generation region of 8 masks, drafts at 0.70 .. 0.77 rising to the right, all above
    wide_in_thres 0.6. Without sigma the cap (5) takes the five rightmost. With sigma=1 nothing is decoded yet, so
    the density is the prompt side's Gaussian tail (D_0 = 0.30, falling fast): every score is below 0.6 and only
    the forced count goes, to the best score, position 0 next to the prompt."""
    from lmeval_dllm.samplers.certainty_prior import certainty_density

    main = logit_rows([0.70 + 0.01 * i for i in range(8)], range(10, 18))
    s, plain = block_state([[MASK] * 8]), wino(wide_in_thres=0.6)
    plain.begin_block(s)
    assert plain.step(torch.cat([main, main])[None], s).commit[0].tolist() == [False] * 3 + [True] * 5
    s, prior = block_state([[MASK] * 8]), wino(wide_in_thres=0.6, sigma=1.0)
    prior.begin_block(s)
    density = certainty_density(torch.zeros(1, 8, dtype=torch.bool), 1.0)[0]
    assert round(density[0].item(), 4) == 0.3005 and (density.diff() < 0).all()
    assert prior.step(torch.cat([main, main])[None], s).commit[0].tolist() == [True] + [False] * 7
    s, loose = block_state([[MASK] * 8]), wino(wide_in_thres=0.04, sigma=1.0)  # 0.71 * D_1 = 0.0416 > 0.04
    loose.begin_block(s)
    assert loose.step(torch.cat([main, main])[None], s).commit[0].tolist() == [True, True] + [False] * 6


def test_a_predicted_mask_is_never_drafted():
    s, sampler = block_state([[MASK] * 6]), wino()
    sampler.begin_block(s)
    main = logit_rows([0.97] + [0.1] * 5, [MASK] + list(range(11, 16)))
    out = sampler.step(torch.cat([main, main])[None], s)
    # position 0's draft is its best other token, at that token's probability (0.03 / 31): not above 0.6
    assert out.commit[0].tolist() == [False, True, False, False, False, False]
    assert out.tokens[0, 0].item() != MASK


def test_token_probability_keeps_confidences_near_one_apart():
    logits = torch.zeros(1, 3, V)
    logits[0, :, 5] = torch.tensor([25.0, 21.0, 30.0])  # 1 - p = 31 e^-25, 31 e^-21, 31 e^-30: all 1.0 in float32
    p = token_probability(logits, torch.full((1, 3), 5))
    assert p.dtype == torch.float64
    assert torch.softmax(logits, -1)[0, :, 5].tolist() == [1.0, 1.0, 1.0]
    assert p[0].argsort(descending=True).tolist() == [2, 0, 1]
    expected = torch.softmax(logits.double(), -1)[0, :, 5]
    assert torch.allclose(1 - p[0], 1 - expected, rtol=1e-4, atol=1e-15)  # float64 carries 1e-16 near 1


@pytest.mark.parametrize("kw", [{}, {"alg": "maskgit_plus", "top_p": 0.8, "temperature": 0.7},
                                {"logits_eos_inf": True}, {"confidence_eos_eot_inf": True},
                                {"alg": "maskgit_plus", "top_k": 5, "confidence_eos_eot_inf": True,
                                 "logits_eos_inf": True}])
def test_draft_confidence_is_the_proposals_only_more_precise(kw):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, V) * 3
    proposal = Proposal.from_params(**kw).bind(3, 4)
    proposed = proposal(logits)
    conf = build_sampler("wino", proposal)._confidence(logits, proposed.tokens, proposed.confidence)
    assert conf.dtype == torch.float64 and torch.allclose(conf.float(), proposed.confidence, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    ({"wide_in_thres": 1.5}, r"wide_in_thres must be in \[0, 1\] \(a probability\), got 1.5"),
    ({"narrow_out_thres": -0.1}, r"narrow_out_thres must be in \[0, 1\] \(a probability\), got -0.1"),
    ({"num_transfer_tokens": 0}, "num_transfer_tokens must be an integer >= 1, got 0"),
    ({"threshold": 0.9}, "unknown parameter 'threshold' for strategy 'wino'"),
    ({"sigma": 0.0}, r"sigma must be a finite number > 0"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        wino(**kw)


# --- the shadow block ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0, 1])
def test_shadow_attention_leaves_out_exactly_the_own_position(shift):
    from lmeval_dllm.caches.base import extended_mask

    B, P, G, L = 2, 3, 8, 4
    x = torch.randint(0, 20, (B, P + G))
    key_mask = torch.ones(B, P + G, dtype=torch.bool)
    key_mask[1, 0] = False  # a left-padded prompt
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    block = slice(P + 4, P + 8)
    extra = shadow_rows(x, pos, key_mask, block, MASK, shift)
    T, E = P + G, L * (1 + shift)
    sees = extra.sees
    assert extra.ids.shape == extra.position_ids.shape == (B, E) and sees.shape == (B, E, T + E)
    queries = sees[:, E - L:]  # the rows whose outputs are the leave-one-out predictions
    blocked = ~queries[:, :, :T] & key_mask[:, None, :]  # blocked real, non-padding keys
    assert blocked.sum(-1).tolist() == [[1] * L] * B  # exactly one per shadow row ...
    assert blocked.nonzero()[:, 2].view(B, L).tolist() == [list(range(block.start, block.stop))] * B  # ... its own
    assert not sees[1, :, 0].any()  # padding stays hidden from the shadow too
    assert torch.equal(extra.position_ids[:, :L], pos[:, block])  # [MASK] stand-ins at the block's positions
    assert (extra.ids[:, :L] == MASK).all()
    if shift == 0:
        assert sees[:, :, T:].all()  # LLaDA: shadow tokens see each other (the release's mask)
    else:  # Dream: Q_i = column s+i-1 at its position, predicting s+i; sees every stand-in and itself only
        assert torch.equal(extra.ids[:, L:], x[:, block.start - 1:block.stop - 1])
        assert torch.equal(extra.position_ids[:, L:], pos[:, block.start - 1:block.stop - 1])
        assert sees[:, L:, T:T + L].all() and torch.equal(sees[0, L:, T + L:], torch.eye(L, dtype=torch.bool))
        assert not sees[:, :L, T + L:].any()
    # through the cache seam, no canvas row sees the shadow block
    state = DecodeState(x=x, position_ids=pos, attention_mask=key_mask, prompt_len=P, mask_token_id=MASK,
                        stop_token_ids=NEVER)
    full = extended_mask(state, extra, torch.arange(T))[:, 0]
    assert not full[:, :T, T:].any() and torch.equal(full[:, :T, :T], key_mask[:, None, :].expand(B, T, T))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_layer_shadow_prediction_ignores_only_its_own_token(tmp_path, family):
    """With one layer every key comes straight from the embeddings, so the leave-one-out row for column s+i
    cannot depend on the token at s+i, and does depend on the others (Dream: mind the logit shift)."""
    from lmeval_dllm.caches import Cache
    from lmeval_dllm.models import load_model
    from lmeval_dllm.tiny import write_checkpoint

    layers = {"n_layers": 1} if family == "llada" else {"num_hidden_layers": 1}
    model = load_model(write_checkpoint(str(tmp_path), family, seed=3, **layers))
    torch.manual_seed(0)
    P, L = 5, 4
    x = torch.randint(0, 250, (1, P + 2 * L))
    block = slice(P, P + L)
    sampler = wino()
    state = DecodeState(x=x, position_ids=torch.arange(x.shape[1])[None], attention_mask=None, prompt_len=P,
                        mask_token_id=model.mask_token_id, stop_token_ids=NEVER)

    def shadow(canvas):
        state.x = canvas
        return sampler.forward(model, Cache(), state, block).logits[0, L:]

    base = shadow(x)
    for i in range(L):
        y = x.clone()
        y[0, P + i] = (y[0, P + i] + 7) % 250
        changed = (shadow(y) - base).abs().amax(-1) > 0
        assert changed.tolist() == [j != i for j in range(L)], f"{family}: changing column s+{i}"


# --- a scripted decode with a known re-mask --------------------------------------------------------------------


class ShadowScript:
    """Stands in for a DiffusionLM under WINO. Block column j's target is 10 + j. Column 5 first believes in the
    wrong token 25 (0.8) until four block columns are decoded; column 4 is unsure (0.2) until five are; column 3
    until three are. The leave-one-out distribution gives a decoded target 0.95 and anything else 0.2. Rows in
    ``easy_rows`` are sure of every target (0.95 - 0.01 j)."""

    logit_shift, mask_token_id, device, dtype = 0, MASK, torch.device("cpu"), torch.float32
    block_size = None  # bidirectional (DiffusionLM.block_size)

    def __init__(self, easy_rows=()):
        self.calls, self.easy_rows = 0, set(easy_rows)

    def __call__(self, ids, pos, attention, cache=None, logits_index=None):
        self.calls += 1
        L = logits_index.shape[0] // 2
        s = int(logits_index[0])
        return torch.stack([self._row(ids[b, s:s + L].tolist(), b in self.easy_rows) for b in range(ids.shape[0])])

    @staticmethod
    def _row(cols, easy):
        decoded = sum(c != MASK for c in cols)
        main_conf, main_tok, shadow_conf, shadow_tok = [], [], [], []
        for j, c in enumerate(cols):
            tok, conf = 10 + j, {0: 0.9, 1: 0.9, 2: 0.7, 6: 0.1, 7: 0.65}.get(j, 0.95)
            if j == 3:
                conf = 0.8 if decoded >= 3 else 0.3
            if j == 4:
                conf = 0.75 if decoded >= 5 else 0.2
            if j == 5 and decoded < 4:
                tok, conf = 25, 0.8
            if easy:
                tok, conf = 10 + j, 0.95 - 0.01 * j
            main_conf.append(conf), main_tok.append(tok)
            shadow_tok.append(c if c != MASK else 0), shadow_conf.append(0.95 if c == 10 + j else 0.2)
        return torch.cat([logit_rows(main_conf, main_tok), logit_rows(shadow_conf, shadow_tok)])


def test_scripted_decode_drafts_wide_then_revokes_the_wrong_token():
    model = ShadowScript()
    out = generate(model, torch.tensor([[1, 2, 3]]), None, wino(), GenerationConfig(8, 8), stop_token_ids=NEVER)
    # step 0: m = 8, cap 5: {0, 1, 2, 5 (wrong 25), 7} above 0.6. step 1: {3, 4} accepted (2 > 1), budget
    # 5 - 1 = 4: column 5 (leave-one-out 0.2 < 0.9) is re-masked. step 2: column 5, now 15. step 3: column 6.
    assert out.tokens[0].tolist() == list(range(10, 18))
    assert out.decoded_at[0].tolist() == [0, 0, 0, 1, 1, 2, 3, 0]
    assert out.steps == model.calls == 4 and out.nfe.tolist() == [4]
    assert out.committed.tolist() == [9]  # 8 positions, column 5 twice


def test_scripted_decode_semi_autoregressive_blocks_end_fully_decoded():
    model = ShadowScript()
    out = generate(model, torch.tensor([[1, 2, 3]]), None, wino(), GenerationConfig(16, 8), stop_token_ids=NEVER)
    assert out.tokens[0].tolist() == list(range(10, 18)) * 2
    assert out.steps == 8 and (out.tokens != MASK).all()


# --- invariants on the tiny checkpoints ------------------------------------------------------------------------


def _recording(sampler):
    """Wrap ``sampler.step`` to record, per step, (block start, accepted per row, re-masked per row, previous
    accept count per row, rows active)."""
    log, step = [], sampler.step

    def recorded(logits, state):
        prev = state.sampler_state["prev_accept"].clone()
        out = step(logits, state)
        log.append((state.block.start, out.commit.sum(-1).tolist(), out.remask.sum(-1).tolist(), prev.tolist(),
                    state.active.tolist()))
        return out

    sampler.step = recorded
    return log


def _tiny(tiny_dir):
    from transformers import AutoTokenizer

    from lmeval_dllm.models import load_model

    return load_model(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("kw", [{"wide_in_thres": 0.02, "narrow_out_thres": 0.5},
                                {"wide_in_thres": 0.01, "narrow_out_thres": 0.9, "num_transfer_tokens": 2}])
def test_invariants_and_batch_equals_each_prompt_alone(tiny_dir, kw):
    """Every step: accepting exactly n never re-masks, re-masks <= previous accepts - n; every block ends with
    nothing masked within ceil(L / n) steps; a left-padded batch gives each prompt what it gives alone."""
    model, tok = _tiny(tiny_dir)
    prompts = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]
    enc, ids, mask = left_pad(tok, prompts)
    P = ids.shape[1]
    G, Lb, n = 16, 8, kw.get("num_transfer_tokens", 1)
    sampler = wino(**kw)
    log = _recording(sampler)
    batch = generate(model, ids, mask, sampler, GenerationConfig(G, Lb), stop_token_ids=NEVER)
    assert (batch.tokens != model.mask_token_id).all()
    remasked = 0
    for _, accepted, remasks, prev, active in log:
        for a, r, p, on in zip(accepted, remasks, prev, active):
            if on:
                assert r == 0 if a <= n else r <= max(p - n, 0)
                remasked += r
    assert remasked > 0, "the setting must exercise re-masking"
    for start in (P, P + Lb):
        assert sum(1 for s, *_ in log if s == start) <= math.ceil(Lb / n)
    for i, e in enumerate(enc):
        alone = generate(model, torch.tensor([e]), None, wino(**kw), GenerationConfig(G, Lb), stop_token_ids=NEVER)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), f"row {i} ({prompts[i]!r}) with {kw}"
        assert alone.nfe[0] == batch.nfe[i]


def test_rows_finish_their_blocks_independently():
    """§14.7: the reference narrowed the window by row 0 and crashed once row 0 finished a block before another
    row. Here row 0 needs 2 steps per block (cap 5, then 3), row 1 needs 4 with a re-mask; each row's decode is
    the one it gets alone, and every block ends fully decoded."""
    prompts = torch.tensor([[1, 2, 3], [1, 2, 3]])
    batch = generate(ShadowScript(easy_rows=[0]), prompts, None, wino(), GenerationConfig(16, 8),
                     stop_token_ids=NEVER)
    assert batch.nfe.tolist() == [4, 8] and batch.steps == 8
    assert batch.tokens.tolist() == [list(range(10, 18)) * 2] * 2
    assert batch.decoded_at[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 4, 4, 4, 4, 4, 5, 5, 5]
    alone = generate(ShadowScript(), prompts[1:], None, wino(), GenerationConfig(16, 8), stop_token_ids=NEVER)
    assert alone.decoded_at[0].tolist() == batch.decoded_at[1].tolist() == [0, 0, 0, 1, 1, 2, 3, 0,
                                                                             4, 4, 4, 5, 5, 6, 7, 4]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_refreshed_every_step_give_the_no_cache_decode(tiny_dir, cache):
    """The shadow block runs as extra rows through prefix / dual caches; refreshed at every step they are exact."""
    from lmeval_dllm.caches import build_cache

    model, tok = _tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, ["What is 12+30?", "Hi"])
    kw = {"wide_in_thres": 0.02, "narrow_out_thres": 0.5}
    exact = generate(model, ids, mask, wino(**kw), GenerationConfig(16, 8), stop_token_ids=NEVER)
    cached = generate(model, ids, mask, wino(**kw), GenerationConfig(16, 8), stop_token_ids=NEVER,
                      cache=build_cache(cache, refresh_interval=1))
    assert cached.tokens.tolist() == exact.tokens.tolist() and cached.nfe.tolist() == exact.nfe.tolist()
    approx = generate(model, ids, mask, wino(**kw), GenerationConfig(16, 8), stop_token_ids=NEVER,
                      cache=build_cache(cache))
    assert (approx.tokens != model.mask_token_id).all()
    for i, e in enumerate(enc):  # approximate, yet each row is exactly what its prompt gets alone through it
        alone = generate(model, torch.tensor([e]), None, wino(**kw), GenerationConfig(16, 8), stop_token_ids=NEVER,
                         cache=build_cache(cache))
        assert alone.tokens[0].tolist() == approx.tokens[i].tolist() and alone.nfe[0] == approx.nfe[i], f"row {i}"


@pytest.mark.parametrize("cache", ["dllm", "d2cache"])
def test_caches_without_extra_rows_are_refused(llada_dir, cache):
    from lmeval_dllm.caches import build_cache

    model, _ = _tiny(llada_dir)
    with pytest.raises(ValueError, match=f"strategy 'wino' cannot be used with cache='{cache}': the strategy runs "
                                         "rows that are not part of the canvas"):
        generate(model, torch.tensor([[1, 2]]), None, wino(), GenerationConfig(4, 4), stop_token_ids=NEVER,
                 cache=build_cache(cache))


# --- the lm_eval command line ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_cli_on_tiny_dream_at_batch_sizes_3_and_1(tmp_path, dream_dir):
    """The real command line, on Dream (the shifted leave-one-out construction): a batch of three prompts and a
    batch of one in one run (tests/cli_run.py)."""
    from cli_run import run_lm_eval

    results, samples, stats = run_lm_eval(
        tmp_path, f"pretrained={dream_dir},strategy=wino,wide_in_thres=0.05,narrow_out_thres=0.5,gen_length=8,"
                  "block_length=4")
    assert results["n-samples"] == {"smoke_three": {"original": 5, "effective": 3},
                                    "smoke_one": {"original": 1, "effective": 1}}
    assert results["config"]["dllm_strategy"] == "wino"
    assert results["config"]["dllm_stats"]["requests"] == 4 and results["config"]["dllm_stats"]["batches"] == 2
    assert len(samples["smoke_three"]) == 3 and len(samples["smoke_one"]) == 1
    assert sorted(r["batch_size"] for r in stats) == [1, 3, 3, 3]
    assert [r["gen_length"] for r in stats] == [8] * 4
    assert all(2 <= r["nfe"] <= 8 for r in stats)  # two blocks of 4, each in 1 to 4 steps
