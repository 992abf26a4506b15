"""Certainty prior (lmeval_dllm/samplers/certainty_prior.py): the density against the formula summed term by term,
the worked example, and its effect on the decoding order of every score-based strategy."""

from __future__ import annotations

import math

import pytest
import torch

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.samplers.certainty_prior import certainty_density
from scripted import EOS, EOT, ScriptedModel


def density_by_formula(decoded: list[bool], sigma: float) -> list[float]:
    """D_j = sum_{m=-G}^{2G-1} u~_m exp(-(j-m)^2 / 2 sigma^2) / sum_{d=-3G}^{3G-1} exp(-d^2 / 2 sigma^2), in floats."""
    G = len(decoded)
    kernel = lambda d: math.exp(-d * d / (2 * sigma * sigma))  # noqa: E731
    z = sum(kernel(d) for d in range(-3 * G, 3 * G))
    u = lambda m: 1.0 if m < 0 else float(decoded[m]) if m < G else float(decoded[-1])  # noqa: E731
    return [sum(u(m) * kernel(j - m) for m in range(-G, 2 * G)) / z for j in range(G)]


@pytest.mark.parametrize("G", [1, 5, 8, 13])
@pytest.mark.parametrize("sigma", [0.5, 3.0, 10.0])
def test_density_equals_direct_summation(G, sigma):
    g = torch.Generator().manual_seed(G)
    decoded = torch.rand(4, G, generator=g) < 0.5
    decoded[0] = False
    decoded[1] = True
    got = certainty_density(decoded, sigma)
    want = torch.tensor([density_by_formula(row, sigma) for row in decoded.tolist()])
    assert got.dtype == torch.float32 and got.shape == (4, G)
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=0)


def test_worked_example_nothing_decoded():
    """Spec §0.5: G = 8, nothing decoded, sigma = 10 -> a monotone preference for positions near the prompt."""
    got = certainty_density(torch.zeros(1, 8, dtype=torch.bool), 10.0)[0]
    want = torch.tensor([0.287, 0.274, 0.259, 0.242, 0.224, 0.206, 0.187, 0.169])
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    assert (got[1:] < got[:-1]).all()


def test_right_boundary_counts_as_decoded_only_when_the_last_position_is():
    last = torch.tensor([[False] * 7 + [True]])
    none = torch.zeros(1, 8, dtype=torch.bool)
    d_last, d_none = certainty_density(last, 2.0)[0].tolist(), certainty_density(none, 2.0)[0].tolist()
    assert d_last[6] > 0.4 > 0.001 > d_none[6] and d_last[0] - d_none[0] == pytest.approx(0.0, abs=1e-3)
    assert certainty_density(torch.ones(1, 8, dtype=torch.bool), 2.0)[0, 4].item() == pytest.approx(1.0, abs=1e-6)


# --- the prior inside the strategies (scripted model; one token everywhere, so equal scores tie exactly) --------

TARGETS = [[10] * 8]
SCORES = [[2.0, 2.0, 2.0, 6.0, 2.0, 2.0, 2.0, 2.0]]  # position 3 is by far the most confident
STOPS = torch.tensor([EOS, EOT])


def decode_order(strategy, **kw):
    sampler = build_sampler(strategy, Proposal.from_params(), **kw)
    out = generate(ScriptedModel(TARGETS, SCORES), torch.tensor([[1, 2, 3]]), None, sampler, GenerationConfig(8, 8),
                   stop_token_ids=STOPS)
    return out.decoded_at[0].tolist()


@pytest.mark.parametrize("strategy,kw", [
    ("vanilla", {}),
    ("pc_sampler", {"debias": False, "lambd": 0.0}),
    ("eb_sampler", {"gamma": 0.0}),
    ("klass", {"threshold": 1.0}),  # no position passes the gate: klass falls back to top-1 every step
])
def test_small_sigma_decodes_next_to_the_prompt_first(strategy, kw):
    assert decode_order(strategy, **kw) == [1, 2, 3, 0, 4, 5, 6, 7]  # confidence first: position 3
    # sigma = 1: the density next to decoded context outweighs the 4.8x confidence ratio -> left to right
    assert decode_order(strategy, sigma=1.0, **kw) == [0, 1, 2, 3, 4, 5, 6, 7]
    # a very wide prior is nearly constant: the confidence order again
    assert decode_order(strategy, sigma=1e4, **kw) == [1, 2, 3, 0, 4, 5, 6, 7]


def test_sigma_scales_the_score_ar_compares_with_its_threshold():
    # conf(6.0) = 0.93 >= 0.9, but at the masked frontier D is about 0.3-0.5, so conf * D < 0.9
    targets, scores = [[10] * 4], [[6.0] * 4]

    def ar(**kw):
        sampler = build_sampler("ar", Proposal.from_params(), threshold=0.9, **kw)
        return generate(ScriptedModel(targets, scores), torch.tensor([[1, 2]]), None, sampler, GenerationConfig(4, 4),
                        stop_token_ids=STOPS).decoded_at[0].tolist()

    assert ar() == [0, 0, 0, 0]
    assert ar(sigma=1.0) == [0, 1, 2, 3]


@pytest.mark.parametrize("strategy", ["vanilla", "pc_sampler", "eb_sampler", "klass", "ar"])
@pytest.mark.parametrize("sigma,msg", [(0.0, "sigma must be a finite number > 0"), (float("nan"), "got nan"),
                                       (-1.0, "got -1.0")])
def test_invalid_sigma(strategy, sigma, msg):
    kw = {"threshold": 0.5} if strategy == "ar" else {"debias": False} if strategy == "pc_sampler" else {}
    with pytest.raises(ValueError, match=msg):
        build_sampler(strategy, Proposal.from_params(), sigma=sigma, **kw)


def test_sigma_rejects_negative_entropy_confidence():
    with pytest.raises(ValueError, match="with alg=entropy the confidence is a negative entropy"):
        build_sampler("vanilla", Proposal.from_params(alg="entropy"), sigma=10.0)
