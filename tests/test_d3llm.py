"""D3LLMSampler (lmeval_dllm/samplers/d3llm.py): several blocks in flight, entropy-threshold commits, the block-add
and activation rules, the early-stop EOS fill. On hand-built logits, then through the decode loop on the tiny
checkpoints with every cache."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from batches import assert_each_row_as_alone, left_pad, tiny
from samplers_support import MASK, entropy_of_peaked, peaked, state_with

from lmeval_dllm.caches import CACHES, build_cache
from lmeval_dllm.decoding import resolve
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.d3llm import entropy64

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]
EOS = 8


def sampler(proposal=None, **kw):
    return build_sampler("d3llm", proposal or Proposal.from_params().bind(EOS, None), **kw)


def prepared(s, rows, block_length=4, added=None):
    """A state over ``rows`` (generation region, MASK = undecided) with ``s`` started: the loop's block is the whole
    region, ``block_length`` the sampler's block; ``added`` overrides the blocks each row has added so far."""
    state = state_with(rows)
    state.block_length = block_length
    s.start(state)
    if added is not None:
        state.sampler_state["added"] = torch.tensor(added)
    return state


def H(c):
    return entropy_of_peaked(c)


def test_entropy_is_the_releases_formula():
    logits = peaked([0.9, 0.5], [1, 2])  # float32 logits: the entropies agree to float32's rounding of them
    assert entropy64(logits)[0].tolist() == pytest.approx([H(0.9), H(0.5)], abs=1e-6)
    assert entropy64(logits).dtype == torch.float64
    wide = torch.randn(2, 150, 7, generator=torch.Generator().manual_seed(0))  # three chunks of columns
    p = torch.softmax(wide.double(), -1)
    assert torch.equal(entropy64(wide), -(p * torch.log(p + 1e-12)).sum(-1))


def test_llada_rule_commits_the_lowest_entropy_candidate_and_every_one_at_or_below_threshold():
    # two blocks of 4, both added (block 2 added now: block 1 is 1/4 decoded >= 0.1). Entropies: H(0.9) = 0.545,
    # H(0.99) = 0.08, H(0.5) = 1.79; threshold 0.6: positions 1 (0.545), 5 (0.08); nothing else
    s = sampler(rule="llada", threshold=0.6)
    state = prepared(s, [[3, MASK, MASK, MASK, MASK, MASK, MASK, MASK]])
    conf = [0.99, 0.9, 0.5, 0.5, 0.5, 0.99, 0.5, 0.5]
    out = s.step(peaked(conf, [1, 2, 3, 4, 5, 6, 7, 1]), state)
    assert out.commit.tolist() == [[False, True, False, False, False, True, False, False]]
    assert state.sampler_state["added"].tolist() == [2]
    assert out.tokens[0, 1] == 2 and out.tokens[0, 5] == 6 and out.overwrite is None
    # threshold 0: the lowest-entropy candidate of all the blocks in flight (position 5, block 2), and, since that
    # left the fully activated block 1 without a commit, block 1's lowest (position 1)
    s = sampler(rule="llada", threshold=0.0)
    state = prepared(s, [[3, MASK, MASK, MASK, MASK, MASK, MASK, MASK]])
    out = s.step(peaked(conf, [1, 2, 3, 4, 5, 6, 7, 1]), state)
    assert out.commit.tolist() == [[False, True, False, False, False, True, False, False]]
    # block 1 done: block 2 is the first fully activated block with masks and holds the overall lowest: position 5
    # alone
    state = prepared(s, [[3, 3, 3, 3, MASK, MASK, MASK, MASK]])
    out = s.step(peaked(conf, [1, 2, 3, 4, 5, 6, 7, 1]), state)
    assert out.commit.tolist() == [[False, False, False, False, False, True, False, False]]


def test_the_llada_threshold_is_inclusive_and_the_dream_threshold_strict():
    logits = peaked([0.9, 0.9, 0.5, 0.5], [1, 2, 3, 4])
    th = float(entropy64(logits)[0, 0])  # exactly the entropy of positions 0 and 1
    for rule, expect in (("llada", [True, True, False, False]), ("dream", [False, False, False, False])):
        s = sampler(rule=rule, threshold=th, decoded_token_threshold=1.0)
        state = prepared(s, [[MASK] * 4], block_length=4)
        # dream: nothing strictly below: the fully activated block 1 gets its lowest-entropy candidate (position 0)
        out = s.step(logits, state)
        assert out.commit.tolist() == [expect if rule == "llada" else [True, False, False, False]], rule


def test_only_added_blocks_are_candidates_and_one_block_is_added_per_pass():
    # block 1 has nothing decoded: block 2 is not added (0 < 0.1), so its confident positions wait
    s = sampler(rule="dream", threshold=1.0)
    state = prepared(s, [[MASK] * 8])
    conf = [0.5, 0.5, 0.5, 0.5, 0.99, 0.99, 0.99, 0.99]
    out = s.step(peaked(conf, [1] * 8), state)
    assert state.sampler_state["added"].tolist() == [1]
    assert out.commit.tolist() == [[True] + [False] * 7]  # the forced best of block 1 (ties: the first)
    # block 1 at 1/4 >= 0.1: block 2 is added, and only block 2 (at most one block per pass)
    state = prepared(s, [[3, MASK, MASK, MASK] + [MASK] * 8], block_length=4)
    out = s.step(peaked([0.5] * 4 + [0.99] * 8, [1] * 12), state)
    assert state.sampler_state["added"].tolist() == [2]
    assert out.commit[0, 4:8].all() and not out.commit[0, 8:].any()


@pytest.mark.parametrize("fraction, adds", [(0.25, True), (0.5, True), (0.75, False)])
def test_block_add_threshold_is_the_last_blocks_decoded_fraction(fraction, adds):
    s = sampler(rule="dream", threshold=0.0, block_add_threshold=0.5)
    decoded = round(fraction * 4)
    state = prepared(s, [[3] * (4 - decoded) + [MASK] * decoded + [MASK] * 4])
    s.step(peaked([0.5] * 8, [1] * 8), state)
    # decoded fraction = 1 - masks / 4 in block 1
    assert state.sampler_state["added"].tolist() == [2 if 1 - decoded / 4 >= 0.5 else 1]
    assert adds == (1 - decoded / 4 >= 0.5)


def test_a_done_block_adds_the_next_even_at_block_add_threshold_one():
    s = sampler(rule="dream", threshold=0.0, block_add_threshold=1.0)
    state = prepared(s, [[3, 3, 3, 3] + [MASK] * 4])
    out = s.step(peaked([0.5] * 8, [1] * 8), state)
    assert state.sampler_state["added"].tolist() == [2]
    assert out.commit.tolist() == [[False] * 4 + [True, False, False, False]]  # block 2 is activated (1 >= 0.95)


def test_progress_goes_to_the_first_fully_activated_block_with_masks():
    # blocks 1 and 2 added; block 1 is 1/4 decoded < 0.95, so block 2 is not activated: with nothing below the
    # threshold the forced commit is block 1's best (position 2, the lowest entropy there), not block 2's
    s = sampler(rule="dream", threshold=0.01)
    state = prepared(s, [[3, MASK, MASK, MASK] + [MASK] * 4], added=[2])
    out = s.step(peaked([0.5, 0.6, 0.7, 0.5, 0.99, 0.99, 0.99, 0.99], [1] * 8), state)
    assert out.commit.tolist() == [[False, False, True, False, False, False, False, False]]
    # a commit in block 1 already (the llada rule's overall best is there): nothing more is forced
    s = sampler(rule="llada", threshold=0.01)
    state = prepared(s, [[3, MASK, MASK, MASK] + [MASK] * 4], added=[2])
    out = s.step(peaked([0.5, 0.6, 0.9, 0.5, 0.7, 0.7, 0.7, 0.7], [1] * 8), state)
    assert out.commit.tolist() == [[False, False, True, False, False, False, False, False]]
    # block 1 at 3/4 >= decoded_token_threshold 0.7: block 2 is activated, but block 1 is still the first with
    # masks; once block 1 is done, block 2 gets the forced commit
    s = sampler(rule="dream", threshold=0.01, decoded_token_threshold=0.7)
    state = prepared(s, [[3, 3, 3, 3] + [MASK] * 4], added=[2])
    out = s.step(peaked([0.5] * 4 + [0.5, 0.6, 0.5, 0.5], [1] * 8), state)
    assert out.commit.tolist() == [[False] * 5 + [True, False, False]]


def test_rows_keep_their_own_blocks():
    s = sampler(rule="dream", threshold=1.0)
    rows = [[MASK] * 8, [3, 3, MASK, MASK] + [MASK] * 4]
    state = prepared(s, rows)
    conf = [[0.5, 0.5, 0.5, 0.5, 0.99, 0.99, 0.99, 0.99]] * 2
    out = s.step(peaked(conf, [[1] * 8] * 2), state)
    assert state.sampler_state["added"].tolist() == [1, 2]
    assert out.commit.tolist() == [[True] + [False] * 7, [False, False, True, False, True, True, True, True]]


def test_early_stop_sets_everything_after_the_first_eos_to_eos():
    # positions 1 and 5 commit (entropy 0.08 <= 0.6); position 1 is EOS: position 5's commit is dropped and every
    # later position becomes EOS, masked or decoded (position 3 held a 4)
    s = sampler(rule="llada", threshold=0.6, early_stop=True)
    state = prepared(s, [[3, MASK, MASK, 4, MASK, MASK, MASK, MASK]], added=[2])
    out = s.step(peaked([0.5, 0.99, 0.5, 0.5, 0.5, 0.99, 0.5, 0.5], [1, EOS, 1, 1, 1, 6, 1, 1]), state)
    assert out.commit.tolist() == [[False, True, False, False, False, False, False, False]]
    assert out.overwrite.tolist() == [[False, False, True, True, True, True, True, True]]
    assert out.tokens[0, 1:].tolist() == [EOS] * 7
    # the masks the fill sets to EOS (not position 3, decoded, nor 5, committed in this pass) are candidates once
    # more in the next pass, as the release's stale mask map makes them
    assert state.sampler_state["filled"].tolist() == [[False, False, True, False, True, False, True, True]]
    # with an EOS on the canvas no block is added
    s = sampler(rule="dream", threshold=0.0, early_stop=True)
    state = prepared(s, [[3, EOS, MASK, MASK] + [MASK] * 4])
    s.step(peaked([0.5] * 8, [1] * 8), state)
    assert state.sampler_state["added"].tolist() == [2]  # the release marks every block after the EOS as added


def test_the_rule_follows_the_models_family(llada_dir, dream_dir):
    for directory, rule in ((llada_dir, "llada"), (dream_dir, "dream")):
        model, tok = tiny(directory)
        s = sampler()
        seen = {}
        step = s.step
        s.step = lambda logits, state: (seen.setdefault("rule", state.sampler_state["rule"]), step(logits, state))[1]
        generate(model, torch.tensor([[5, 6, 7]]), None, s, GenerationConfig(8, 4), stop_token_ids=torch.tensor([-1]))
        assert seen["rule"] == rule


@pytest.mark.parametrize("kw, msg", [
    ({"threshold": -0.1}, "threshold must be a finite number >= 0 (an entropy in nats), got -0.1"),
    ({"threshold": math.inf}, "threshold must be a finite number >= 0 (an entropy in nats), got inf"),
    ({"block_add_threshold": 1.5}, "block_add_threshold must be in [0, 1] (a decoded fraction of a block), got 1.5"),
    ({"decoded_token_threshold": -1.0},
     "decoded_token_threshold must be in [0, 1] (a decoded fraction of a block), got -1.0"),
    ({"rule": "fast"}, "rule must be one of llada, dream (or None: the model family's), got 'fast'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        sampler(**kw)


def test_remasking_and_alg_are_refused_and_early_stop_needs_an_eos():
    with pytest.raises(ValueError, match="remasking / alg = 'random' cannot be used with it"):
        build_sampler("d3llm", Proposal.from_params(remasking="random"))
    with pytest.raises(ValueError, match="remasking / alg = 'entropy' cannot be used with it"):
        resolve("d3llm", None, {"alg": "entropy"})
    s = build_sampler("d3llm", Proposal.from_params(), early_stop=True)
    with pytest.raises(ValueError, match="early_stop=True needs the tokenizer's EOS token id"):
        s.start(state_with([[MASK] * 4]))
    with pytest.raises(ValueError, match="unknown"):
        resolve("d3llm", None, {"steps": 256})


# ---------------------------------------------------------------------------------------------------------------
# Through the decode loop, on the tiny checkpoints


# Blocks overlap with these; the threshold is the model's median first-pass entropy (the tiny random models' are
# 4.5 to 5.5 nats), so some positions of a pass commit and some wait.
PARALLEL = {"threshold": "median", "block_add_threshold": 0.25, "decoded_token_threshold": 0.5}


@functools.lru_cache(maxsize=None)
def median_entropy(model) -> float:
    x = torch.tensor([[5, 6, 7] + [model.mask_token_id] * 16])
    logits = model.predict(x, torch.arange(19)[None], slice(3, 19))
    return float(entropy64(logits)[0, :4].median())  # the first block's: some of its positions commit, some wait


def run(model, ids, mask, cache=None, gen_length=16, block_length=4, eos=-1, **kw):
    if kw.get("threshold") == "median":
        kw["threshold"] = median_entropy(model)
    s = build_sampler("d3llm", Proposal.from_params().bind(eos, None), **kw)
    return generate(model, ids, mask, s, GenerationConfig(gen_length, block_length),
                    stop_token_ids=torch.tensor([eos]), cache=build_cache(cache[0], **cache[1]) if cache else None)


def test_at_thresholds_one_the_blocks_decode_one_after_another(tiny_dir):
    """block_add_threshold = decoded_token_threshold = 1: a block starts only once the one before is done (the
    release's sequential generate)."""
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    out = run(model, ids, mask, threshold="median", block_add_threshold=1.0, decoded_token_threshold=1.0)
    at = out.decoded_at.view(3, 4, 4)
    assert (at[:, 1:].amin(-1) > at[:, :-1].amax(-1)).all()
    assert (out.nfe < 16).any()  # and in parallel inside a block (for some rows)


def test_blocks_overlap_and_every_pass_commits(tiny_dir):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    out = run(model, ids, mask, **PARALLEL)
    at = out.decoded_at.view(3, 4, 4)
    # a block had a commit in a pass in which (or before) the previous block still had masks
    assert (at[:, 1:].amin(-1) <= at[:, :-1].amax(-1)).any()
    assert (out.tokens != model.mask_token_id).all() and (out.decoded_at >= 0).all()
    for r in range(3):  # every pass of a row committed something
        assert sorted(set(out.decoded_at[r].tolist())) == list(range(int(out.nfe[r])))


def test_early_stop_through_the_loop_fills_after_the_first_eos_and_stops(llada_dir):
    model, tok = tiny(llada_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    plain = run(model, ids, mask, **PARALLEL)
    eos = int(plain.tokens[0, 5])  # a token row 0 decodes: an EOS for this test
    out = run(model, ids, mask, eos=eos, early_stop=True, **PARALLEL)
    for r in range(3):
        row = out.tokens[r].tolist()
        if eos in row:
            first = row.index(eos)
            assert row[first:] == [eos] * (16 - first) and model.mask_token_id not in row
    assert eos in out.tokens[0].tolist() and out.nfe[0] < plain.nfe[0]


BIDIRECTIONAL_CACHES = [(name, {}) for name, c in CACHES.items() if not c.needs_block_causal]  # not cache=block


@pytest.mark.parametrize("cache", [None, *BIDIRECTIONAL_CACHES], ids=lambda c: c[0] if c else "none")
def test_batch_equals_each_prompt_alone_with_every_cache(tiny_dir, cache):
    """A left-padded batch gives each row what its prompt gives alone (the release runs batch size 1 only)."""
    model, tok = tiny(tiny_dir)
    enc, ids, mask = left_pad(tok, PROMPTS)
    eos = int(run(model, ids, mask, **PARALLEL).tokens[1, 6])
    batch = run(model, ids, mask, cache, eos=eos, early_stop=True, **PARALLEL)
    assert (batch.nfe < 16).all()
    assert_each_row_as_alone(batch, enc, lambda x: run(model, x, None, cache, eos=eos, early_stop=True, **PARALLEL),
                             cache)


@pytest.mark.parametrize("cache", [("prefix", {"refresh_interval": 1}), ("dual", {"refresh_interval": 1}),
                                   ("dllm", {"kp": 1, "kr": 1}), ("d2cache", {"refresh_interval": 1}),
                                   ("vicinity", {"refresh_interval": 1})], ids=lambda c: c[0])
def test_a_cache_refreshed_every_step_equals_no_cache(tiny_dir, cache):
    model, tok = tiny(tiny_dir)
    _, ids, mask = left_pad(tok, PROMPTS)
    exact = run(model, ids, mask, None, **PARALLEL)
    cached = run(model, ids, mask, cache, **PARALLEL)
    assert torch.equal(cached.tokens, exact.tokens) and torch.equal(cached.nfe, exact.nfe)
