"""The decode loop (lmeval_dllm/generate.py) with a scripted model whose decoding order is known, and with the
tiny real checkpoints for the invariants (batching, padding, seeds)."""

from __future__ import annotations

import pytest
import torch
from batches import left_pad

from lmeval_dllm.generate import GenerationConfig, finished_rows, first_stop, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from scripted import EOS, EOT, MASK, ScriptedModel

STOPS = torch.tensor([EOS, EOT])
PROMPT = torch.tensor([[1, 2, 3]])


def run(model, sampler_kw=None, G=8, Lb=4, prompt=PROMPT, stops=STOPS, **prop):
    sampler = build_sampler("vanilla", Proposal.from_params(**prop), **(sampler_kw or {}))
    return generate(model, prompt, None, sampler, GenerationConfig(G, Lb), stop_token_ids=stops)


def test_one_token_per_step_in_confidence_order_block_by_block():
    targets = [[10, 11, 12, 13, 14, 15, 16, 17]]
    # block 2 is more confident than block 1 but must wait for it (semi-AR confinement)
    scores = [[2.0, 5.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0]]
    out = run(ScriptedModel(targets, scores))
    assert out.tokens.tolist() == targets
    assert out.decoded_at.tolist() == [[3, 0, 2, 1, 4, 5, 6, 7]]
    assert out.nfe.tolist() == [8] and out.steps == 8


def test_num_transfer_tokens_and_steps_schedule():
    targets, scores = [list(range(10, 18))], [[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]
    out = run(ScriptedModel(targets, scores), {"num_transfer_tokens": 3})
    assert out.decoded_at.tolist() == [[0, 0, 0, 1, 2, 2, 2, 3]]  # ceil(4/3) = 2 steps per block
    # steps=6 over 2 blocks: 3 steps per block, LLaDA's linear schedule for 4 masks = [2, 1, 1]
    out = run(ScriptedModel(targets, scores), {"steps": 6})
    assert out.decoded_at.tolist() == [[0, 0, 1, 2, 3, 3, 4, 5]]
    assert out.steps == 6


def test_threshold_commits_all_confident_at_least_one():
    targets = [list(range(10, 18))]
    scores = [[6.0, 6.0, 1.0, 6.0, 1.0, 0.5, 0.2, 0.1]]  # conf(6) = 0.93, conf(1) = 0.08
    out = run(ScriptedModel(targets, scores), {"threshold": 0.9})
    assert out.decoded_at.tolist() == [[0, 0, 1, 0, 2, 3, 4, 5]]  # 3 at once, then top-1 fallback
    assert out.tokens.tolist() == targets


def test_threshold_above_every_confidence_equals_one_token_per_step():
    targets = [list(range(10, 18))]
    scores = [[2.0, 5.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0]]  # highest confidence 0.996 < 1.0
    a = run(ScriptedModel(targets, scores), {"threshold": 1.0})
    b = run(ScriptedModel(targets, scores), {"num_transfer_tokens": 1})
    assert a.decoded_at.tolist() == b.decoded_at.tolist() and a.tokens.tolist() == b.tokens.tolist()
    assert a.steps == b.steps == 8


def test_factor_commits_whole_block_when_all_satisfy_the_bound():
    targets = [list(range(10, 18))]
    scores = [[9.0] * 8]  # conf 0.9996: (n + 1)(1 - c) <= 1 for every n <= 4
    out = run(ScriptedModel(targets, scores), {"factor": 1.0})
    assert out.decoded_at.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_ties_break_by_lower_position():
    out = run(ScriptedModel([list(range(10, 18))], [[1.0] * 8]))
    assert out.decoded_at.tolist() == [list(range(8))]


def test_eos_stops_row_early_with_the_same_answer():
    # EOS at position 5 is confident early; positions after it are the least confident.
    targets = [[10, 11, 12, 13, 14, EOS, 16, 17]]
    scores = [[5.0, 4.0, 3.0, 2.0, 2.0, 9.0, 0.1, 0.2]]
    early = run(ScriptedModel(targets, scores), G=8, Lb=8)
    full = run(ScriptedModel(targets, scores), G=8, Lb=8, stops=torch.tensor([999]))
    assert early.answer_length.tolist() == [5]
    assert early.tokens[0, :6].tolist() == full.tokens[0, :6].tolist() == targets[0][:6]
    assert early.tokens[0, 6:].tolist() == [MASK, MASK]  # never decoded: nothing after EOS matters
    assert early.nfe.tolist() == [6] and full.nfe.tolist() == [8]


def test_finished_row_skips_later_blocks_while_others_continue():
    targets = [[10, EOS, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25, 26, 27]]
    scores = [[5.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]]
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = run(ScriptedModel(targets, scores), prompt=prompt)
    assert out.nfe.tolist() == [2, 8]
    assert out.tokens[1].tolist() == targets[1]
    assert out.tokens[0, :2].tolist() == [10, EOS] and (out.tokens[0, 2:] == MASK).all()


def test_first_stop_and_finished_rows():
    gen = torch.tensor([[5, EOS, MASK], [MASK, EOT, 7], [1, 2, 3]])
    assert first_stop(gen, STOPS).tolist() == [1, 1, 3]
    assert finished_rows(gen, STOPS, MASK).tolist() == [True, False, False]


def test_generation_config_errors():
    with pytest.raises(ValueError, match="gen_length=100 is not divisible by block_length=32"):
        GenerationConfig(100, 32)
    with pytest.raises(ValueError, match="gen_length must be an integer >= 1, got 0"):
        GenerationConfig(0, 1)


# --- invariants on the tiny real checkpoints -------------------------------------------------------------------


def _tiny(tiny_dir):
    from transformers import AutoTokenizer

    from lmeval_dllm.models import load_model

    return load_model(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("kw", [{}, {"threshold": 0.02}, {"steps": 8}, {"factor": 3.0}])
def test_batch_equals_each_prompt_alone(tiny_dir, kw):
    """A left-padded batch gives, token for token, what each prompt gives alone."""
    model, tok = _tiny(tiny_dir)
    prompts = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]
    enc, ids, mask = left_pad(tok, prompts)
    sampler = build_sampler("vanilla", Proposal.from_params(), **kw)
    cfg = GenerationConfig(16, 8)
    stops = torch.tensor([tok.eos_token_id])
    batch = generate(model, ids, mask, sampler, cfg, stop_token_ids=stops)
    for i, e in enumerate(enc):
        alone = generate(model, torch.tensor([e]), None, sampler, cfg, stop_token_ids=stops)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), f"row {i} ({prompts[i]!r}) with {kw}"
        assert alone.nfe[0] == batch.nfe[i]


def test_same_seed_same_sample(llada_dir):
    model, tok = _tiny(llada_dir)
    _, ids, mask = left_pad(tok, ["Sample me", "and me too"])
    sampler = build_sampler("vanilla", Proposal.from_params(temperature=1.0))
    cfg = GenerationConfig(16, 16)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, sampler, cfg, stop_token_ids=torch.tensor([999]), generator=g).tokens

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


class StaleCache:
    """A cache bug: after the first step it reports no column of the block as recomputed, so nothing can be
    committed (a mutated Dream shift once made the suite hang like this)."""

    name = "stale"
    lacks: dict = {}

    def __init__(self):
        from lmeval_dllm.caches import Cache

        self.inner, self.calls = Cache(), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, model, state, targets, extra=None):
        from lmeval_dllm.state import StepLogits

        out = self.inner.forward(model, state, targets, extra)
        self.calls += 1
        if self.calls == 1:
            return out
        return StepLogits(out.logits, torch.zeros_like(state.x, dtype=torch.bool))


def test_a_block_that_never_finishes_stops_with_an_error_naming_the_step_and_rows():
    targets, scores = [[10, 11, 12, 13, 14, 15, 16, 17]] * 2, [[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 2
    sampler = build_sampler("vanilla", Proposal.from_params())
    assert sampler.step_budget(4) == 32  # 4 * block_length + 16
    cache = StaleCache()
    with pytest.raises(RuntimeError) as e:
        generate(ScriptedModel(targets, scores), torch.tensor([[1, 2, 3]] * 2), None, sampler,
                 GenerationConfig(8, 4), stop_token_ids=STOPS, cache=cache)
    assert str(e.value) == (
        "block 0 (columns 3-7 of the canvas) is still undecided after 32 forward passes (step 32 of this call) in "
        "rows [0, 1]: strategy 'vanilla' with cache='stale' committed nothing that finishes it (the strategy's "
        "budget is 32 passes per block); this is a bug in the strategy or cache")
    assert cache.calls == 32


def test_daedal_budget_covers_its_growth_steps():
    sampler = build_sampler("daedal", Proposal.from_params().bind(1, None), initial_gen_length=8, max_gen_length=64,
                            expansion_factor=8)
    assert sampler.step_budget(32) == 7 + 2 * 64 + 4 * 32 + 16
