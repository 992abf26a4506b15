"""LowConfidenceSampler (lmeval_dllm/samplers/vanilla.py): one step on hand-built logits, schedules, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.state import DecodeState
from lmeval_dllm.samplers.vanilla import dream_count, linear_schedule

MASK = 9


def state_with(block_tokens, prompt=(1, 2)):
    x = torch.tensor([list(prompt) + block_tokens])
    s = DecodeState(x=x, position_ids=torch.arange(x.shape[1])[None], attention_mask=None, prompt_len=len(prompt),
                    mask_token_id=MASK, stop_token_ids=torch.tensor([8]))
    s.block = slice(len(prompt), x.shape[1])
    s.active = torch.tensor([True])
    return s


def peaked(confidences, tokens, vocab=10):
    """(1, L, V) logits whose argmax is tokens[i] with softmax probability confidences[i]."""
    rows = []
    for c, t in zip(confidences, tokens):
        rest = (1 - c) / (vocab - 1)
        rows.append([math.log(c) if v == t else math.log(rest) for v in range(vocab)])
    return torch.tensor([rows])


def test_step_commits_only_masked_block_positions():
    s = state_with([MASK, 5, MASK, MASK])
    logits = peaked([0.99, 0.98, 0.5, 0.7], [3, 4, 5, 6])
    out = build_sampler("vanilla", Proposal.from_params(), num_transfer_tokens=2).step(logits, s)
    assert out.commit.tolist() == [[True, False, False, True]]  # position 1 is decoded: not a candidate
    assert out.tokens.tolist() == [[3, 4, 5, 6]]


def test_linear_schedule_matches_llada():
    assert linear_schedule(torch.tensor([10, 4]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 1]]
    assert linear_schedule(torch.tensor([32]), 8).tolist() == [[4] * 8]


def test_dream_count_follows_the_time_grid():
    """steps=4, eps=1e-3: t = 1, 0.75025, 0.5005, 0.25075, 0.001. Of 16 masks: floor(16 * 0.24975) = 3, then
    floor(13 * 0.33289) = 4, floor(9 * 0.49900) = 4, and the last step takes the 5 left."""
    t = torch.linspace(1, 1e-3, 5)
    left, counts = 16, []
    for i in range(4):
        n = dream_count(torch.arange(16)[None] < left, t, i)
        counts.append(n.item())
        left -= n.item()
    assert counts == [3, 4, 4, 5] and left == 0
    # steps = masks: the first step's share is 16 * (1 - 0.937563 / 1) = 0.999: nothing is committed
    assert dream_count(torch.ones(2, 16, dtype=torch.bool), torch.linspace(1, 1e-3, 17), 0).tolist() == [0, 0]


def test_dream_schedule_through_the_loop():
    """The loop runs Dream's counts (a step may commit nothing), in order of confidence, in as many passes as steps."""
    from scripted import ScriptedModel

    from lmeval_dllm.generate import GenerationConfig, generate

    G = 16
    model = ScriptedModel(targets=[list(range(G))], scores=[[float(G - j) for j in range(G)]])
    sampler = build_sampler("vanilla", Proposal.from_params(alg="entropy"), steps=4, schedule="dream")
    out = generate(model, torch.tensor([[1, 2]]), None, sampler, GenerationConfig(G, G),
                   stop_token_ids=torch.tensor([10**6]))
    assert out.tokens.tolist() == [list(range(G))]
    assert out.decoded_at.tolist() == [[0] * 3 + [1] * 4 + [2] * 4 + [3] * 5]  # left to right by confidence
    assert out.nfe.tolist() == [4] and model.calls == 4
    sixteen = build_sampler("vanilla", Proposal.from_params(alg="entropy"), steps=G, schedule="dream")
    out = generate(model, torch.tensor([[1, 2]]), None, sixteen, GenerationConfig(G, G),
                   stop_token_ids=torch.tensor([10**6]))
    assert out.nfe.tolist() == [G] and out.committed.tolist() == [G]
    assert out.decoded_at[0, 0].item() > 0  # step 0 commits nothing (16 * 0.0624 floors to 0)


@pytest.mark.parametrize("kw,msg", [
    ({"steps": 8, "num_transfer_tokens": 2}, "steps=8 and num_transfer_tokens=2 both set the per-step count"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"num_transfer_tokens": -1}, "num_transfer_tokens must be an integer >= 1, got -1"),
    ({"threshold": 0.9, "factor": 1.0}, "two parallel-decoding rules"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\] \(a probability\), got 1.5"),
    ({"threshold": -0.1}, r"threshold must be in \[0, 1\]"),
    ({"threshold": float("nan")}, "threshold must be a finite number, got nan"),
    ({"factor": 0.0}, "factor must be a finite number > 0, got 0.0"),
    ({"threshhold": 0.9}, "unknown parameter 'threshhold' for strategy 'vanilla'; did you mean 'threshold'"),
    ({"threshold": "high"}, r"threshold='high': expected a number or None"),
    ({"schedule": "cosine"}, "schedule must be one of linear, dream, got 'cosine'"),
    ({"schedule": "dream"}, "schedule=dream needs steps"),
    ({"eps": 0.01}, r"eps=0.01 is the end of Dream's time grid and only applies with schedule=dream"),
    ({"schedule": "dream", "steps": 4, "eps": 1.0}, r"eps must be a number in \(0, 1\), got 1.0"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_sampler("vanilla", Proposal.from_params(), **kw)


def test_entropy_threshold_range():
    with pytest.raises(ValueError, match="alg=entropy"):
        build_sampler("vanilla", Proposal.from_params(alg="entropy"), threshold=0.5)
    build_sampler("vanilla", Proposal.from_params(alg="entropy"), threshold=-0.5)


def test_steps_must_fit_the_blocks():
    s = build_sampler("vanilla", Proposal.from_params(), steps=10)
    with pytest.raises(ValueError, match=r"steps=10 must be at most gen_length=16 and divisible by the number of "
                                         r"blocks \(16 // block_length=4 = 4\)"):
        s.validate_lengths(16, 4)
    s.validate_lengths(20, 10)
    with pytest.raises(ValueError, match="steps=10 must be at most gen_length=8"):
        s.validate_lengths(8, 8)


def test_unknown_strategy_suggests():
    with pytest.raises(ValueError, match="unknown strategy 'vanila'; did you mean 'vanilla'\\? available: vanilla"):
        build_sampler("vanila", Proposal.from_params())



@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin"])
def test_dream_schedule_batch_equals_each_prompt_alone(dream_dir, alg):
    """Dream's rule averages the mask count over the batch; left-padded rows hold the same count, so a batch of
    prompts decodes exactly as each prompt alone (tokens and passes)."""
    from batches import left_pad
    from transformers import AutoTokenizer

    from lmeval_dllm.generate import GenerationConfig, generate
    from lmeval_dllm.models import load_model

    model, tok = load_model(dream_dir), AutoTokenizer.from_pretrained(dream_dir)
    prompts = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]
    enc, ids, mask = left_pad(tok, prompts)
    sampler = build_sampler("vanilla", Proposal.from_params(alg=alg), steps=8, schedule="dream")
    never = torch.tensor([10**6])
    batch = generate(model, ids, mask, sampler, GenerationConfig(16, 16), stop_token_ids=never)
    assert batch.nfe.tolist() == [8, 8, 8]
    for i, e in enumerate(enc):
        alone = generate(model, torch.tensor([e]), None, sampler, GenerationConfig(16, 16), stop_token_ids=never)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), prompts[i]
