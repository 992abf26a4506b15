"""The Monte-Carlo likelihood estimator (lmeval_dllm/likelihood.py): what it converges to, checked against the
exact expectation computed by enumerating every mask subset of a 3-token continuation on the tiny models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.likelihood import MonteCarloLikelihood, estimate, greedy_matches, masked_nll, stratified_counts
from lmeval_dllm.models import load_model
from lmeval_dllm.samplers import Proposal, build_sampler

CONTEXT, CONTINUATION = [72, 101, 108, 108, 111], [32, 119, 111]  # "Hello" + " wo"


@pytest.fixture(scope="module")
def models(llada_dir, dream_dir):
    return {"llada": load_model(llada_dir), "dream": load_model(dream_dir)}


def subset_log_probs(model, context, continuation, anchor=()) -> dict[tuple[int, ...], float]:
    """{S: Σ_{j in S} log p(r_j | context, r with S masked)} for every non-empty subset S, one forward each."""
    ids = torch.tensor([*context, *continuation, *anchor])
    P, L = len(context), len(continuation)
    out = {}
    for size in range(1, L + 1):
        for S in itertools.combinations(range(L), size):
            x = ids.clone()
            x[[P + j for j in S]] = model.mask_token_id
            logp = torch.log_softmax(model(x[None], torch.arange(len(ids))[None]).float()[0], dim=-1)  # (T, V)
            row = lambda j: P + j - model.logit_shift  # noqa: E731 - Dream reads position t from row t-1
            out[S] = sum(float(logp[row(j), continuation[j]]) for j in S)
    return out


def llada_expectation(subsets: dict, L: int) -> float:
    """E[estimate] = Σ_m f(m) / m, f(m) = mean over the size-m subsets (each row's count is uniform on 1..L)."""
    f = {m: sum(v for S, v in subsets.items() if len(S) == m) / math.comb(L, m) for m in range(1, L + 1)}
    return sum(f[m] / m for m in f)


def dream_expectation(subsets: dict, L: int, eps: float) -> float:
    """E[estimate] = Σ_S w(|S|) Σ_{j in S} log p, w(k) = 1/(1-eps) ∫_eps^1 p^(k-1) (1-p)^(L-k) dp: a row masks
    each position with probability p = (1-eps) t + eps, t ~ U[0, 1), and is weighted 1/p."""

    def w(k):
        a, c = k - 1, L - k  # ∫ p^a (1-p)^c dp expanded binomially
        terms = (math.comb(c, r) * (-1) ** r * (1 - eps ** (a + r + 1)) / (a + r + 1) for r in range(c + 1))
        return sum(terms) / (1 - eps)

    return sum(w(len(S)) * v for S, v in subsets.items())


def rms_error(model, exact, mc_num, seeds, **kw) -> float:
    est = MonteCarloLikelihood(mc_num=mc_num, mc_batch_size=min(mc_num, 32), **kw)
    anchor = [model.args.eos_token_id] if est.anchors_eos else []
    errors = [estimate(model, CONTEXT, CONTINUATION, est, seed=s, anchor_ids=anchor) - exact for s in seeds]
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def test_llada_estimate_converges_to_the_enumerated_bound(models):
    """Invariant: the LLaDA estimate is unbiased for Σ_m f(m)/m; its error falls like 1/sqrt(mc_num)."""
    model = models["llada"]
    exact = llada_expectation(subset_log_probs(model, CONTEXT, CONTINUATION), len(CONTINUATION))
    errors = [rms_error(model, exact, m, seeds=range(6), scheme="llada") for m in (8, 128, 2048)]
    # measured on the tiny checkpoint: 0.62, 0.15, 0.025 against an exact value of -16.40
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.06 and errors[0] / errors[2] > 6, (exact, errors)


def test_dream_estimate_converges_to_the_enumerated_expectation(models):
    """Invariant: Dream's estimate (independent masks at rate p, weight 1/p) is unbiased for the enumerated
    expectation. Its 1/p weights make it heavy-tailed, so the test uses eps = 0.1 (weights <= 10)."""
    model = models["dream"]
    subsets = subset_log_probs(model, CONTEXT, CONTINUATION, anchor=[model.args.eos_token_id])
    exact = dream_expectation(subsets, len(CONTINUATION), eps=0.1)
    errors = [rms_error(model, exact, m, seeds=range(6), scheme="dream", sampling_eps=0.1) for m in (16, 256, 4096)]
    assert errors[0] > errors[1] > errors[2], errors
    # measured on the tiny checkpoint: 2.7, 0.87, 0.30 against an exact value of -20.81
    assert errors[2] < 0.45 and errors[0] / errors[2] > 5, (exact, errors)
    # eps -> 0 gives back the LLaDA bound: w(k) -> B(k, L - k + 1) = 1 / (k C(L, k))
    assert dream_expectation(subsets, 3, eps=0.0) == pytest.approx(llada_expectation(subsets, 3), rel=1e-12)


def test_one_token_continuation_is_exact_for_any_mc_num(models):
    """With L = 1 every LLaDA sample masks the token with weight 1: the estimate is log p exactly (why the
    LLaDA paper uses mc_num = 1 for single-token answers)."""
    model = models["llada"]
    logp = subset_log_probs(model, CONTEXT, [CONTINUATION[0]])[(0,)]
    for mc_num, batch in [(1, 32), (3, 2), (5, 5)]:
        value = estimate(model, CONTEXT, [CONTINUATION[0]], MonteCarloLikelihood(mc_num=mc_num, mc_batch_size=batch),
                         seed=0)
        assert value == pytest.approx(logp, abs=1e-5)


def test_mc_num_smaller_than_or_not_a_multiple_of_the_batch(models):
    """The reference divides by zero when mc_num < batch size; here the last group is just smaller."""
    assert MonteCarloLikelihood(mc_num=3, mc_batch_size=32).groups() == [3]
    assert MonteCarloLikelihood(mc_num=5, mc_batch_size=2).groups() == [2, 2, 1]
    for scheme in ("llada", "dream"):
        est = MonteCarloLikelihood(scheme=scheme, mc_num=3, mc_batch_size=32)
        mask, weight = est.draw(4, torch.Generator().manual_seed(0))
        assert mask.shape == (3, 4) and weight.shape == (3,) and bool(torch.isfinite(weight).all())
        value = estimate(models[scheme], CONTEXT, CONTINUATION, est, seed=0,
                         anchor_ids=[models[scheme].args.eos_token_id] if est.anchors_eos else [])
        assert math.isfinite(value) and value < 0


def test_stratified_counts_are_uniform_per_row():
    """Row i of a group masks ((k - 1 + round(i L / b)) mod L) + 1 tokens: a bijection of k, so each row's count
    is uniform on 1..L. The reference rounds k + i L / b half-to-even, which is not (L=3, b=2: row 1 masks
    2, 1, 1 tokens for k = 1, 2, 3)."""
    for L in range(1, 9):
        for b in range(1, 11):
            counts = torch.stack([stratified_counts(k, L, b) for k in range(1, L + 1)])  # (L, b): k x row
            assert torch.equal(counts.sort(dim=0).values, torch.arange(1, L + 1)[:, None].expand(L, b)), (L, b)
    assert stratified_counts(1, 3, 2).tolist() == [1, 3] and stratified_counts(2, 3, 2)[1] == 1
    reference = [((torch.round(torch.linspace(float(k), k + 1.5, 2)).long() - 1) % 3 + 1)[1].item() for k in (1, 2, 3)]
    assert reference == [2, 1, 1]
    # a drawn group: the row masks exactly its count and is weighted L / count
    mask, weight = MonteCarloLikelihood(mc_num=7, mc_batch_size=7).draw(5, torch.Generator().manual_seed(0))
    assert torch.equal(weight, 5 / mask.sum(-1).double())
    assert sorted(mask.sum(-1).tolist()) in [sorted(stratified_counts(k, 5, 7).tolist()) for k in range(1, 6)]


def test_splitting_rows_does_not_change_the_estimate(models):
    """The draws are made before any forward pass: scoring the rows one by one (what the OOM fallback does)
    gives the estimate of scoring them in groups, up to float32 rounding (matmul shapes differ)."""
    est = MonteCarloLikelihood(mc_num=12, mc_batch_size=8)
    whole = estimate(models["llada"], CONTEXT, CONTINUATION, est, seed=3)

    def one_by_one(score, n):
        return torch.cat([score(i, i + 1) for i in range(n)])

    assert estimate(models["llada"], CONTEXT, CONTINUATION, est, seed=3, run_rows=one_by_one) == pytest.approx(
        whole, abs=1e-5)
    assert estimate(models["llada"], CONTEXT, CONTINUATION, est, seed=4) != whole  # the seed matters


def test_masked_nll_scores_only_masked_positions(models):
    model = models["llada"]
    ids = torch.tensor(CONTEXT + CONTINUATION)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    nll = masked_nll(model, ids, slice(5, 8), mask)
    subsets = subset_log_probs(model, CONTEXT, CONTINUATION)
    assert nll[1] == 0
    assert nll[0].item() == pytest.approx(-subsets[(0,)], abs=1e-5)
    assert nll[2].item() == pytest.approx(-subsets[(0, 1, 2)], abs=1e-5)


def test_greedy_check_agrees_with_one_token_per_step_decoding(models):
    """LLaDA's greedy check (commit the most confident masked position, L passes) is the vanilla strategy with
    one token per step at temperature 0: what that decodes passes the check; one token changed fails it."""
    model = models["llada"]
    sampler = build_sampler("vanilla", Proposal.from_params(), num_transfer_tokens=1)
    out = generate(model, torch.tensor([CONTEXT]), None, sampler, GenerationConfig(4, 4),
                   stop_token_ids=torch.tensor([], dtype=torch.long))
    decoded = out.tokens[0].tolist()
    assert greedy_matches(model, CONTEXT, decoded)
    assert not greedy_matches(model, CONTEXT, decoded[:-1] + [(decoded[-1] + 1) % 256])


@pytest.mark.parametrize("kw,msg", [
    ({"mc_num": 0}, "mc_num must be an integer >= 1, got 0"),
    ({"mc_batch_size": -1}, "mc_batch_size must be an integer >= 1, got -1"),
    ({"sampling_eps": 1.0}, r"sampling_eps must be a number in \[0, 1\), got 1.0"),
    ({"sampling_eps": float("nan")}, r"sampling_eps must be a number in \[0, 1\), got nan"),
    ({"scheme": "mdlm"}, "likelihood scheme must be one of llada, dream, got 'mdlm'"),
])
def test_bad_estimator_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MonteCarloLikelihood(**kw)
