"""ProphetSampler (lmeval_dllm/samplers/prophet.py): the answer's top-2 logit gap against staged thresholds; below
it an ordinary LLaDA step, at or above it every remaining mask committed at once. On hand-built logits, then
through the decode loop on the tiny checkpoints with every cache."""

from __future__ import annotations

import pytest
import torch
from batches import assert_each_row_as_alone, left_pad, tiny
from samplers_support import MASK, state_with

from lmeval_dllm.caches import CACHES, build_cache
from lmeval_dllm.decoding import resolve
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.prophet import answer_gap

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]
V = 10


def sampler(proposal=None, **kw):
    return build_sampler("prophet", proposal or Proposal.from_params(), **kw)


def gapped(tokens, gaps):
    """(B, G, V) logits: ``tokens[b][j]`` has logit ``gaps[b][j]`` (> 0), every other token 0, so the top-1 minus
    top-2 gap is exactly ``gaps[b][j]`` and the confidence rises with it."""
    logits = torch.zeros(len(tokens), len(tokens[0]), V)
    logits.scatter_(-1, torch.tensor(tokens)[..., None], torch.tensor(gaps, dtype=torch.float32)[..., None])
    return logits


def prepared(s, rows, block=(0, 4), passes=0, total=None):
    """A state over ``rows`` (generation region, MASK = undecided) with ``s`` started and its first block begun;
    ``passes`` forward passes already made by every row; ``total`` overrides the planned passes."""
    state = state_with(rows, block=block)
    s.start(state)
    s.begin_block(state)
    state.sampler_state["passes"] += passes
    if total is not None:
        state.sampler_state["total"] = total
    return state


TOK = [1, 2, 3, 4, 5, 6, 7, 8]


def test_gap_below_threshold_takes_the_ordinary_step():
    # answer = generation positions 4, 5; gaps 7.0 and 7.9 average 7.45 < early_threshold 7.5: one token, the block's
    # most confident (position 2, gap 3.0), as LLaDA's low-confidence step
    s = sampler(answer_start=4, answer_length=2)
    state = prepared(s, [[MASK] * 8])
    out = s.step(gapped([TOK], [[1.0, 2.0, 3.0, 0.5, 7.0, 7.9, 1.0, 1.0]]), state)
    assert out.commit.tolist() == [[False, False, True, False, False, False, False, False]]
    assert out.tokens[0, 2] == 3
    assert state.sampler_state["exited"].tolist() == [False]
    assert state.sampler_state["passes"].tolist() == [1]


def test_gap_at_threshold_commits_every_remaining_mask_of_the_generation_to_its_argmax():
    # gaps 7.0 and 8.0 average 7.5 >= 7.5 (the release compares with >=): every masked position, the later block too
    s = sampler(answer_start=4, answer_length=2)
    rows = [[MASK, 5, MASK, MASK, MASK, 6, MASK, MASK]]  # positions 1 and 5 already decoded
    state = prepared(s, rows)
    out = s.step(gapped([TOK], [[1.0, 2.0, 3.0, 0.5, 7.0, 8.0, 1.0, 1.0]]), state)
    assert out.commit.tolist() == [[True, False, True, True, True, False, True, True]]
    assert out.tokens[0, [0, 2, 3, 4, 6, 7]].tolist() == [1, 3, 4, 5, 7, 8]
    assert state.sampler_state["exited"].tolist() == [True]


def test_decoded_answer_positions_count_in_the_gap():
    # the release reads the gap at every answer position, decoded or not: position 5 (decoded) has gap 9
    s = sampler(answer_start=4, answer_length=2)
    state = prepared(s, [[MASK, MASK, MASK, MASK, MASK, 6, MASK, MASK]])
    out = s.step(gapped([TOK], [[1.0, 2.0, 3.0, 0.5, 6.0, 9.0, 1.0, 1.0]]), state)
    assert out.commit[0].sum() == 7


def test_the_gap_is_between_the_two_largest_logits():
    logits = torch.tensor([[[0.0, 4.0, 1.5, 3.0], [2.0, 2.0, -1.0, 0.0]]])
    assert answer_gap(logits).tolist() == [[1.0, 0.0]]
    assert answer_gap(logits.bfloat16()).dtype == torch.float64


@pytest.mark.parametrize("passes, gap, exits", [
    (31, 5.0, False),  # pass 32 of 100: progress 0.32, early phase (7.5)
    (32, 5.0, True),  # pass 33: 0.33 is the middle phase (5.0)
    (65, 2.5, False),  # pass 66: 0.66, still middle
    (66, 2.5, True),  # pass 67: 0.67 is the late phase (2.5)
    (66, 2.4999, False),
    (0, 7.5, True),  # pass 1: early phase, at its threshold
])
def test_phase_thresholds_switch_at_the_releases_progress_bounds(passes, gap, exits):
    s = sampler(answer_start=0, answer_length=1)
    state = prepared(s, [[MASK] * 8], passes=passes, total=100)
    out = s.step(gapped([TOK], [[gap] + [1.0] * 7]), state)
    assert int(out.commit.sum()) == (8 if exits else 1)


def test_progress_counts_the_planned_passes():
    # steps given: the release's max_steps; otherwise the passes num_transfer_tokens per step needs
    s = sampler(steps=8)
    assert s.total_passes(16, 8) == 8
    assert sampler().total_passes(16, 8) == 16
    assert sampler(num_transfer_tokens=3).total_passes(16, 8) == 2 * 3  # ceil(8 / 3) passes per block
    state = prepared(sampler(num_transfer_tokens=3), [[MASK] * 16], block=(0, 8))
    assert state.sampler_state["total"] == 6


def test_custom_thresholds_and_phase_of_each_row():
    s = sampler(early_threshold=3.0, mid_threshold=2.0, late_threshold=1.0, answer_start=0, answer_length=1)
    prog = torch.tensor([0.0, 0.3299, 0.33, 0.6699, 0.67, 1.0], dtype=torch.float64)
    assert s.threshold_at(prog).tolist() == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]


def test_rows_decide_independently():
    s = sampler(answer_start=4, answer_length=1)
    state = prepared(s, [[MASK] * 8, [MASK] * 8])
    out = s.step(gapped([TOK, TOK], [[1.0, 2.0, 3.0, 0.5, 8.0, 1, 1, 1], [1.0, 2.0, 3.0, 0.5, 7.0, 1, 1, 1]]), state)
    assert out.commit[0].all() and out.commit[1].tolist() == [False, False, True] + [False] * 5
    assert state.sampler_state["exited"].tolist() == [True, False]


def test_a_row_that_went_all_in_keeps_committing_every_mask_and_inactive_rows_do_not_count():
    s = sampler(answer_start=4, answer_length=1)
    state = prepared(s, [[MASK] * 8, [MASK] * 8])
    state.active = torch.tensor([True, False])
    high = [[1.0, 2.0, 3.0, 0.5, 8.0, 1, 1, 1]] * 2
    s.step(gapped([TOK, TOK], high), state)
    assert state.sampler_state["exited"].tolist() == [True, False]  # the inactive row neither exits
    assert state.sampler_state["passes"].tolist() == [1, 0]  # nor advances
    state.active = torch.tensor([True, True])
    out = s.step(gapped([TOK, TOK], [[1.0] * 8] * 2), state)  # low gap now: row 0 stays all in
    assert out.commit[0].all() and int(out.commit[1].sum()) == 1


def test_with_a_cache_only_fresh_columns_are_committed_and_stale_gaps_are_kept():
    s = sampler(answer_start=6, answer_length=1)
    state = prepared(s, [[MASK] * 8])
    state.fresh = torch.zeros(1, 10, dtype=torch.bool)
    state.fresh[:, 2:6] = True  # the block (generation 0..3) only: the answer position 6 was not recomputed
    out = s.step(gapped([TOK], [[1.0] * 6 + [9.0, 1.0]]), state)
    assert int(out.commit.sum()) == 1  # never seen: no gap yet (NaN), so no exit, whatever the placeholder logits
    assert torch.isnan(state.sampler_state["gap"]).all()
    state.fresh[:] = True
    out = s.step(gapped([TOK], [[1.0] * 6 + [8.0, 1.0]]), state)  # seen now: 8.0 >= 7.5
    assert out.commit[0].all()
    state.fresh[:, 6:] = False  # the next pass recomputes the block only: the stale gap stays, the rest waits
    state.x[0, 2:4] = 4
    out = s.step(gapped([TOK], [[0.1] * 8]), state)
    assert out.commit.tolist() == [[False, False, True, True, False, False, False, False]]
    assert state.sampler_state["gap"].tolist() == [[8.0]]


def test_all_in_follows_the_proposals_eos_rule():
    proposal = Proposal.from_params(logits_eos_inf=True).bind(8, None)
    s = sampler(proposal, answer_start=0, answer_length=1, early_threshold=0.0)
    state = prepared(s, [[MASK] * 4], block=(0, 2))
    tokens = [[8, 8, 2, 8]]
    logits = gapped(tokens, [[3.0, 3.0, 3.0, 3.0]])
    logits[0, :, 5] = 1.0  # the runner-up of every position
    out = s.step(logits, state)
    assert out.commit[0].all()
    assert out.tokens[0].tolist() == [5, 5, 2, 5]


def test_default_answer_region_scales_the_releases_example_position():
    s = sampler()
    assert s.answer_span(256) == (200, 205)  # the release's README: answer_start_pos = prompt + 200 of 256
    assert s.answer_span(128) == (100, 105)  # its demo: + 100 of 128
    assert s.answer_span(16) == (12, 16)  # clipped at the end of the region, as the release
    assert sampler(answer_start=3, answer_length=2).answer_span(16) == (3, 5)


@pytest.mark.parametrize("kw, msg", [
    ({"early_threshold": -1.0}, r"early_threshold must be a finite number >= 0 \(a gap between two logits\), got -1.0"),
    ({"mid_threshold": float("nan")}, "mid_threshold must be a finite number >= 0"),
    ({"late_threshold": float("inf")}, "late_threshold must be a finite number >= 0"),
    ({"answer_start": -1}, r"answer_start must be an integer >= 0 .* got -1"),
    ({"answer_length": 0}, "answer_length must be an integer >= 1, got 0"),
    ({"steps": 8, "num_transfer_tokens": 2}, "steps=8 and num_transfer_tokens=2 both set the per-step count"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"early_thresh": 3.0}, "unknown parameter 'early_thresh' for strategy 'prophet'; did you mean 'early_threshold'"),
    ({"threshold": 0.9}, "unknown parameter 'threshold' for strategy 'prophet'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        sampler(**kw)


def test_answer_region_outside_the_generation_is_refused_before_any_model_work():
    with pytest.raises(ValueError, match=r"answer_start=64 lies outside the generation region \(gen_length=64"):
        resolve("prophet", None, {"answer_start": 64, "gen_length": 64})
    with pytest.raises(ValueError, match="steps=48 must be at most gen_length=32"):
        resolve("prophet", "dual", {"steps": 48, "gen_length": 32})
    assert resolve("prophet", "dual", {"answer_start": 63, "gen_length": 64}).sampler.answer_span(64) == (63, 64)


# ---------------------------------------------------------------------------------------------------------------
# Through the decode loop, on the tiny checkpoints


# The tiny random models' answer gaps are 0.1 to 1.5 logits: these thresholds exit in every phase.
EXITING = {"early_threshold": 1.2, "mid_threshold": 0.6, "late_threshold": 0.2, "answer_start": 6}
NEVER = {"early_threshold": 1e9, "mid_threshold": 1e9, "late_threshold": 1e9}


def run(model, ids, mask, cache=None, gen_length=16, block_length=8, **kw):
    return generate(model, ids, mask, sampler(**kw), GenerationConfig(gen_length, block_length),
                    stop_token_ids=torch.tensor([-1]), cache=build_cache(cache[0], **cache[1]) if cache else None)


def test_unreachable_thresholds_decode_exactly_as_vanilla(tiny_dir):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    for kw in ({}, {"steps": 8}, {"num_transfer_tokens": 2}):
        ours = run(model, ids, mask, **NEVER, **kw)
        vanilla = generate(model, ids, mask, build_sampler("vanilla", Proposal.from_params(), **kw),
                           GenerationConfig(16, 8), stop_token_ids=torch.tensor([-1]))
        assert torch.equal(ours.tokens, vanilla.tokens) and torch.equal(ours.nfe, vanilla.nfe), kw


def test_an_exit_fills_the_whole_generation_in_that_pass_and_stops(tiny_dir):
    """Late threshold 0, others unreachable: every row exits at its first late-phase pass, n / 16 >= 0.67, n = 11,
    in the second block; the tokens it commits are that pass's argmax, and no pass follows."""
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    kw = {"early_threshold": 1e9, "mid_threshold": 1e9, "late_threshold": 0.0}
    seen = []
    s = sampler(**kw)
    step = s.step
    s.step = lambda logits, state: (seen.append((logits.clone(), state.x.clone())), step(logits, state))[1]
    out = generate(model, ids, mask, s, GenerationConfig(16, 8), stop_token_ids=torch.tensor([-1]))
    assert out.nfe.tolist() == [11, 11, 11] and out.steps == 11
    assert out.committed.tolist() == [16, 16, 16]
    assert (out.decoded_at == 10).sum(-1).tolist() == [16 - 10] * 3  # pass 11 committed the 6 masks left
    logits, x = seen[-1]
    P = ids.shape[1]
    was_masked = x[:, P:] == model.mask_token_id
    assert torch.equal(out.tokens[was_masked], logits.argmax(-1)[was_masked])


@pytest.mark.parametrize("cache", [None, *[(name, {}) for name in CACHES if not CACHES[name].needs_block_causal]],
                         ids=lambda c: c[0] if c else "none")
def test_batch_equals_each_prompt_alone_with_every_cache(tiny_dir, cache):
    """A left-padded batch gives each row what its prompt gives alone (the release runs batch size 1 only)."""
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    batch = run(model, ids, mask, cache, **EXITING)
    assert (batch.tokens != model.mask_token_id).all()
    assert (batch.nfe < 16).any()  # some row went all in
    assert_each_row_as_alone(batch, enc, lambda x: run(model, x, None, cache, **EXITING), cache)


@pytest.mark.parametrize("cache", [("prefix", {"refresh_interval": 1}), ("dual", {"refresh_interval": 1}),
                                   ("dllm", {"kp": 1, "kr": 1}), ("d2cache", {"refresh_interval": 1}),
                                   ("vicinity", {"refresh_interval": 1})], ids=lambda c: c[0])
def test_a_cache_refreshed_every_step_equals_no_cache(tiny_dir, cache):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    exact = run(model, ids, mask, None, **EXITING)
    cached = run(model, ids, mask, cache, **EXITING)
    assert (exact.nfe < 16).any()
    assert torch.equal(cached.tokens, exact.tokens) and torch.equal(cached.nfe, exact.nfe)


def test_dual_cache_all_in_fills_each_later_block_in_one_pass(llada_dir):
    """The dual cache recomputes only the block after a block's first pass: an exit there commits the block's
    masks; the next block's first pass runs the whole canvas and fills everything left."""
    model, tok = tiny(llada_dir)
    enc, _, _ = left_pad(tok, PROMPTS)
    ids = torch.tensor([enc[0]])
    kw = {"early_threshold": 1e9, "mid_threshold": 0.0, "late_threshold": 0.0}  # exits at pass 6 of 16 (0.375)
    exact = run(model, ids, None, None, gen_length=16, block_length=4, **kw)
    dual = run(model, ids, None, ("dual", {}), gen_length=16, block_length=4, **kw)
    assert exact.nfe.tolist() == [6]
    assert (exact.decoded_at[0] == 5).sum() == 11  # the 11 masks left, in pass 6
    # pass 6 is the 2nd pass of block 1 (generation 4..7): it fills that block's 3 masks; pass 7, block 2's first
    # (a full pass), fills blocks 2 and 3
    assert dual.nfe.tolist() == [7]
    assert (dual.decoded_at[0] == 5).sum() == 3 and (dual.decoded_at[0] == 6).sum() == 8
