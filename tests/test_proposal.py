"""Tokens and confidences from hand-built logits (lmeval_dllm/samplers/proposal.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lmeval_dllm.samplers.proposal import Proposal

EOS, EOT = 3, 4


def logits_from_probs(*rows):
    """(1, L, V) logits whose softmax is each given probability row."""
    return torch.tensor([[[math.log(p) if p > 0 else -1e9 for p in row] for row in rows]])


def test_low_confidence_is_probability_of_argmax():
    out = Proposal.from_params()(logits_from_probs([0.1, 0.6, 0.3, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0, 0.0]))
    assert out.tokens.tolist() == [[1, 0]]
    assert out.confidence[0].tolist() == pytest.approx([0.6, 0.5])


def test_dream_confidences():
    logits = logits_from_probs([0.5, 0.3, 0.2, 0.0, 0.0])
    assert Proposal.from_params(alg="maskgit_plus")(logits).confidence.item() == pytest.approx(0.5)
    assert Proposal.from_params(alg="topk_margin")(logits).confidence.item() == pytest.approx(0.2)
    neg_entropy = sum(p * math.log(p + 1e-10) for p in (0.5, 0.3, 0.2))
    assert Proposal.from_params(alg="entropy")(logits).confidence.item() == pytest.approx(neg_entropy, abs=1e-6)


def test_top_p_keeps_the_token_that_crosses_it_and_renormalises():
    logits = logits_from_probs([0.5, 0.3, 0.2, 0.0, 0.0])
    p = Proposal.from_params(alg="maskgit_plus", top_p=0.6)
    assert p(logits).confidence.item() == pytest.approx(0.5 / 0.8)  # ranks 0 and 1 kept
    assert Proposal.from_params(alg="maskgit_plus", top_p=0.4)(logits).confidence.item() == pytest.approx(1.0)
    # LLaDA's low_confidence reads the clean softmax: filters do not change it
    assert Proposal.from_params(top_p=0.6)(logits).confidence.item() == pytest.approx(0.5)


def test_top_k():
    logits = logits_from_probs([0.5, 0.3, 0.2, 0.0, 0.0])
    assert Proposal.from_params(alg="maskgit_plus", top_k=2)(logits).confidence.item() == pytest.approx(0.5 / 0.8)


def test_confidence_eos_eot_inf():
    logits = logits_from_probs([0.1, 0.0, 0.0, 0.6, 0.3], [0.2, 0.1, 0.0, 0.3, 0.4])
    p = Proposal.from_params(confidence_eos_eot_inf=True).bind(EOS, EOT)
    out = p(logits)
    assert out.tokens.tolist() == [[EOS, EOT]]  # still proposed ...
    assert out.confidence[0].tolist() == [0.0, 0.0]  # ... but never preferred
    out = p(logits_from_probs([0.4, 0.0, 0.0, 0.5, 0.1]))
    assert out.tokens.tolist() == [[EOS]] and out.confidence.item() == 0.0
    out = p(logits_from_probs([0.5, 0.0, 0.0, 0.3, 0.2]))
    assert out.tokens.tolist() == [[0]] and out.confidence.item() == pytest.approx(1.0)  # mass renormalised


def test_logits_eos_inf_never_proposes_eos():
    out = Proposal.from_params(logits_eos_inf=True).bind(EOS, EOT)(logits_from_probs([0.1, 0.2, 0.0, 0.6, 0.1]))
    assert out.tokens.tolist() == [[1]]
    assert out.confidence.item() == pytest.approx(0.2 / 0.4)


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))[None, None].expand(1, 4000, 3)
    p = Proposal.from_params(temperature=1.0)
    a = p(logits, torch.Generator().manual_seed(0)).tokens
    b = p(logits, torch.Generator().manual_seed(0)).tokens
    assert torch.equal(a, b)
    freq = torch.bincount(a.flatten(), minlength=3).float() / a.numel()
    assert freq.tolist() == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    # confidence stays the clean probability of the sampled token (LLaDA)
    conf = p(logits, torch.Generator().manual_seed(0)).confidence
    assert set(round(c, 4) for c in conf.flatten().tolist()) <= {0.7, 0.2, 0.1}


def test_random_remasking_priority():
    logits = logits_from_probs([0.1, 0.6, 0.3], [0.7, 0.2, 0.1])
    out = Proposal.from_params(remasking="random")(logits, torch.Generator().manual_seed(0))
    assert out.tokens.tolist() == [[1, 0]]
    expected = torch.rand((1, 2), generator=torch.Generator().manual_seed(0))
    assert out.confidence.tolist() == expected.tolist()


@pytest.mark.parametrize("params", [{}, {"alg": "maskgit_plus"}])
def test_float64_confidence_separates_probabilities_near_one(params):
    """float32 rounds both to 1.0 (a tie); float64, as KLASS's release computes them, keeps them apart."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1], logits[0, 1, 2] = 25.0, 30.0
    p32 = Proposal.from_params(**params)(logits)
    assert p32.confidence.dtype == torch.float32 and p32.confidence.tolist() == [[1.0, 1.0]]
    p64 = Proposal.from_params(**params)(logits, need_probs=True, dtype=torch.float64)
    assert p64.confidence.dtype == torch.float64 and p64.probs.dtype == torch.float64
    assert p64.confidence[0, 0].item() < p64.confidence[0, 1].item() < 1.0
    assert p64.tokens.tolist() == p32.tokens.tolist() == [[1, 2]]


@pytest.mark.parametrize("kw,msg", [
    ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, "top_k must be an integer >= 1"),
    ({"remasking": "low_confidence", "alg": "entropy"}, "both choose the confidence"),
    ({"alg": "maskgit"}, "alg must be one of maskgit_plus, topk_margin, entropy, got 'maskgit'"),
    ({"remasking": "lowconf"}, "remasking must be one of low_confidence, random"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Proposal.from_params(**kw)
