"""KLAdaptiveStabilitySampler (lmeval_dllm/samplers/klass.py): stability over the KL history, the confidence gate
(never a silent vanilla, spec §14.2), the carried distributions of the next block, memory, batching."""

from __future__ import annotations

import math

import pytest
import torch
from batches import left_pad
from samplers_support import MASK, peaked, state_with
from scripted import EOS, EOT, ScriptedModel
from scripted import MASK as SCRIPTED_MASK

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.klass import kl_divergence

CONFIDENT = 6.0  # scripted confidence 0.9286 > 0.9, KLASS's default gate


def run(scores, on_canvas=None, strategy="klass", G=8, Lb=4, **kw):
    sampler = build_sampler(strategy, Proposal.from_params(), **kw)
    model = ScriptedModel([[10] * G] * len(scores), scores, on_canvas=on_canvas)
    return generate(model, torch.tensor([[1, 2]] * len(scores)), None, sampler, GenerationConfig(G, Lb),
                    stop_token_ids=torch.tensor([EOS, EOT]))


def test_kl_divergence():
    p, q = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.25, 0.75]]])
    assert kl_divergence(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert kl_divergence(p, p).item() == 0.0
    assert kl_divergence(p, None).item() == math.inf


def test_stable_confident_positions_are_committed_together():
    """History 2: nothing is stable before the 3rd step of the first block (its first KL has no predecessor).
    The second block's first KL compares with the first block's last step, so it is stable at its 2nd step."""
    out = run([[CONFIDENT] * 8])
    assert out.decoded_at[0].tolist() == [0, 1, 2, 2, 3, 4, 4, 4] and out.steps == 5
    # Spec §14.2: KLASS with its defaults is not vanilla (8 steps, one token each)
    assert run([[CONFIDENT] * 8], strategy="vanilla").steps == 8


def test_history_length_one():
    out = run([[CONFIDENT] * 8], kl_history_length=1)
    assert out.decoded_at[0].tolist() == [0, 1, 1, 1, 2, 2, 2, 2]


def test_unstable_or_unconfident_positions_wait_for_the_fallback():
    # the logits alternate between 6 and 6.5 as tokens are decoded: KL(step t || t-1) is 0.006-0.007
    def drift(gen, scores, cols):
        return scores + 0.5 * ((gen != SCRIPTED_MASK).sum(-1, keepdim=True) % 2)

    assert run([[CONFIDENT] * 8], drift, kl_threshold=0.005).decoded_at[0].tolist() == list(range(8))
    assert run([[CONFIDENT] * 8], drift, kl_threshold=0.01).decoded_at[0].tolist() == [0, 1, 2, 2, 3, 4, 4, 4]
    # stable but not confident enough: only the confident ones go together; the rest one by one (fallback)
    assert run([[CONFIDENT, 2.0, CONFIDENT, CONFIDENT] * 2]).decoded_at[0].tolist() == [0, 3, 1, 2, 4, 6, 5, 5]


def test_confidence_gate_is_strict():
    state = state_with([[MASK] * 4])
    logits = peaked([0.95, 0.95, 0.5, 0.95], [3, 4, 5, 6])
    conf = Proposal.from_params()(logits).confidence[0, 0].item()
    sampler = build_sampler("klass", Proposal.from_params(), threshold=conf, kl_history_length=1)
    sampler.begin_block(state)
    state.sampler_state["p_prev"] = torch.softmax(logits, -1)  # as if the previous step saw the same logits
    assert sampler.step(logits, state).commit.tolist() == [[True, False, False, False]]  # fallback: top-1
    sampler.threshold = conf - 1e-3
    state.sampler_state["kl_history"] = None
    assert sampler.step(logits, state).commit.tolist() == [[True, True, False, True]]


def test_confidence_in_float64_as_the_release():
    """p = 1 - 4e-11 and p = 1 - 3e-13 are both 1.0 in float32; KLASS's release compares them in float64."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1], logits[0, 1, 2] = 25.0, 30.0
    sampler = build_sampler("klass", Proposal.from_params())
    state = state_with([[MASK, MASK]])
    sampler.begin_block(state)
    assert sampler.step(logits, state).commit.tolist() == [[False, True]]  # fallback top-1: the larger p


def test_memory_keeps_two_blocks_in_float32():
    sampler = build_sampler("klass", Proposal.from_params())
    state = state_with([[MASK] * 12] * 2, block=(0, 4))
    sampler.start(state)
    sampler.begin_block(state)
    sampler.step(torch.randn(2, 12, 10), state)  # logits of the whole generation region ("generation" span)
    assert state.sampler_state["p_prev"].shape == (2, 8, 10) and state.sampler_state["p_prev"].dtype == torch.float32
    assert state.sampler_state["kl_history"].shape == (2, 4, 2)


def test_columns_a_cache_skipped_keep_their_memory():
    """state.fresh False (a cache did not recompute the column): no commit there, p_prev and history unchanged."""
    sampler = build_sampler("klass", Proposal.from_params(), threshold=0.0, kl_history_length=1)
    state = state_with([[MASK] * 4], block=(0, 4))
    sampler.begin_block(state)
    first = torch.randn(1, 4, 10)
    sampler.step(first, state)
    before = state.sampler_state["p_prev"].clone()
    state.step_in_block, state.fresh = 1, torch.tensor([[True, True, True, True, True, False]])  # prompt (2) + 4
    out = sampler.step(first + torch.randn(1, 4, 10), state)  # every column changed, but column 3 was skipped
    assert not out.commit[0, 3]
    p_prev = state.sampler_state["p_prev"]
    assert torch.equal(p_prev[0, 3], before[0, 3]) and not torch.equal(p_prev[0, 0], before[0, 0])
    assert state.sampler_state["kl_history"][0, 3, -1].item() == math.inf  # still the first step's (no predecessor)


@pytest.mark.parametrize("kw,msg", [
    ({"kl_threshold": 0.0}, "kl_threshold must be a finite number > 0, got 0.0"),
    ({"kl_history_length": 0}, "kl_history_length must be an integer >= 1, got 0"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
    ({"threshold": None}, "threshold=None: expected a number"),
    ({"factor": 1.0}, "unknown parameter 'factor' for strategy 'klass'"),
    ({"debias": True}, "unknown parameter 'debias' for strategy 'klass'"),
    ({"conf_threshold": 0.9}, "unknown parameter 'conf_threshold'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_sampler("klass", Proposal.from_params(), **kw)


def test_batch_equals_each_prompt_alone(tiny_dir):
    from transformers import AutoTokenizer

    from lmeval_dllm.models import load_model

    tok, model = AutoTokenizer.from_pretrained(tiny_dir), load_model(tiny_dir)
    prompts, ids, mask = left_pad(tok, ["What is 12+30?", "Hi", "A longer prompt!"])
    # the tiny model is nearly uniform: a low gate lets KLASS commit several stable positions at once
    sampler = build_sampler("klass", Proposal.from_params(), threshold=0.0, kl_threshold=0.5)
    cfg, stops = GenerationConfig(16, 8), torch.tensor([tok.eos_token_id])
    batch = generate(model, ids, mask, sampler, cfg, stop_token_ids=stops)
    assert (batch.committed > batch.nfe).all()
    for i, e in enumerate(prompts):
        alone = generate(model, torch.tensor([e]), None, sampler, cfg, stop_token_ids=stops)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist() and alone.nfe[0] == batch.nfe[i], f"row {i}"
