"""Log-likelihood of a continuation under a masked diffusion LM: a Monte-Carlo estimate of a lower bound.

A masked diffusion model has no left-to-right factorisation, so log p(r | c) of a continuation r (L tokens)
after a context c is not a sum of per-token terms. The LLaDA paper (Nie et al., arXiv:2502.09992, Sec. 2.4,
the lower-variance form of the conditional bound) evaluates instead

    log p(r | c) >= E_{l ~ U{1..L}} E_{|S| = l} [ (L / l) Σ_{j ∈ S} log p(r_j | c, r with S masked) ]

(S a uniformly random set of l positions of r), and estimates the expectation with ``mc_num`` Monte-Carlo
samples; the context is never masked. Two samplers of
the masked set S are implemented, one per family's released evaluation code:

- ``llada`` (ML-GSAI/LLaDA ``get_log_likelihood.py``): samples come in groups of ``mc_batch_size``. In a group,
  k ~ U{1..L} is drawn once and row i masks x_i = ((k - 1 + o_i) mod L) + 1 positions (o_i = i * L / b rounded):
  stratified counts, each uniform on 1..L. The positions are a uniformly random subset of that size; the row's
  weight is L / x_i (the 1/t of the bound with t = x_i / L).
- ``dream`` (DreamLM/Dream ``eval/eval.py``, ``_eval_target_nll_mc`` with ``log_type=ftb``): in a group,
  t_i = (u_0 + i / b) mod 1 with u_0 ~ U[0, 1); every continuation position is masked independently with
  probability p_i = (1 - eps) t_i + eps; the weight is 1 / p_i. Dream's encoding appends EOS after the
  continuation as a fixed right anchor (never masked, never scored); its logits are shifted (row t-1 predicts
  position t), which :meth:`DiffusionLM.predict` hides.

The estimate is -(1/M) Σ_s weight_s Σ_{j ∈ S_s} -log p(r_j | ...), M = ``mc_num``.

What it converges to (``tests/test_likelihood.py`` checks it by enumerating every subset): with f(m) the mean
over all subsets S of size m of Σ_{j ∈ S} log p(r_j | c, r with S masked), the ``llada`` estimate has expectation
Σ_{m=1..L} f(m) / m (the bound above); the ``dream`` estimate has expectation Σ_S w(|S|) Σ_{j ∈ S} log p(...)
with w(k) = (1 / (1 - eps)) ∫_eps^1 p^(k-1) (1 - p)^(L-k) dp, which is the same bound when eps = 0.

Deviations from the released code, each for a reason:

- Stratum offsets o_i are rounded on their own (half up). The reference rounds k + i * L / b with torch's
  half-to-even, so when i * L / b is a half-integer a row's count is not uniform (L = 3, b = 2: row 1 masks
  (2, 1, 1) tokens for k = (1, 2, 3)) and the estimate is biased; elsewhere the two agree.
- ``mc_num`` need not be a multiple of ``mc_batch_size``: the last group is smaller. The reference runs
  ``mc_num // batch_size`` groups, i.e. none (a division by zero) when ``mc_num < batch_size``.
- Every request draws from its own generator, seeded from (seed, its tokens): an estimate does not depend on
  batch size, request order, the number of processes, or a resumed run.
- Log-probabilities are computed in float32 (the reference takes the cross-entropy of bf16 logits).
- A random subset of size x is the x smallest of L uniform draws (batched), not one ``randperm`` per row.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from lmeval_dllm.models import DiffusionLM

SCHEMES = ("llada", "dream")

# run_rows(score, n) -> (n,) float64: how rows [0, n) are scored; the lm glue passes one that splits on OOM.
RowRunner = Callable[[Callable[[int, int], torch.Tensor], int], torch.Tensor]


def _run_all(score: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    return score(0, n)


@dataclass(frozen=True)
class MonteCarloLikelihood:
    """The Monte-Carlo likelihood estimator of one family.

    Args:
        scheme: ``llada`` (stratified numbers of masked tokens) or ``dream`` (stratified mask rates).
        mc_num: Monte-Carlo samples per request (LLaDA paper: 128 for most tasks, 1 for single-token answers).
        mc_batch_size: samples per stratified group, and rows per forward pass (halved on out-of-memory).
        sampling_eps: Dream's lowest mask rate eps (its generation config: 1e-3).
    """

    scheme: str = "llada"
    mc_num: int = 128
    mc_batch_size: int = 32
    sampling_eps: float = 1e-3

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"likelihood scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.mc_num < 1:
            raise ValueError(f"mc_num must be an integer >= 1, got {self.mc_num}")
        if self.mc_batch_size < 1:
            raise ValueError(f"mc_batch_size must be an integer >= 1, got {self.mc_batch_size}")
        if not (math.isfinite(self.sampling_eps) and 0.0 <= self.sampling_eps < 1.0):
            raise ValueError(f"sampling_eps must be a number in [0, 1), got {self.sampling_eps!r}")

    @property
    def anchors_eos(self) -> bool:
        """Dream's encoding puts EOS after a continuation (a fixed right anchor)."""
        return self.scheme == "dream"

    def groups(self) -> list[int]:
        """Sizes of the stratified groups: ``mc_batch_size`` each, the last one smaller if needed."""
        full, rest = divmod(self.mc_num, self.mc_batch_size)
        return [self.mc_batch_size] * full + ([rest] if rest else [])

    def draw(self, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked sets and weights of all ``mc_num`` samples for a continuation of ``length`` tokens.

        Returns:
            mask (`torch.BoolTensor` of shape `(mc_num, length)`): True = masked (scored) position.
            weight (`torch.DoubleTensor` of shape `(mc_num,)`): L / x for ``llada``, 1 / p for ``dream``.
        """
        if length < 1:
            raise ValueError("the continuation is empty: there is nothing to score")
        draw = self._draw_llada if self.scheme == "llada" else self._draw_dream
        masks, weights = zip(*(draw(length, b, generator) for b in self.groups()))
        return torch.cat(masks), torch.cat(weights)

    @staticmethod
    def _draw_llada(L: int, b: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(torch.randint(1, L + 1, (), generator=generator))
        count = stratified_counts(k, L, b)  # (b,)
        noise = torch.rand(b, L, generator=generator, dtype=torch.float64)
        rank = noise.argsort(-1).argsort(-1)  # (b, L): a uniformly random order of the positions
        mask = rank < count[:, None]
        return mask, L / count.double()

    def _draw_dream(self, L: int, b: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u0 = torch.rand((), generator=generator, dtype=torch.float64)
        t = (u0 + torch.arange(b, dtype=torch.float64) / b) % 1.0
        p = (1.0 - self.sampling_eps) * t + self.sampling_eps  # (b,)
        mask = torch.rand(b, L, generator=generator, dtype=torch.float64) < p[:, None]
        return mask, 1.0 / p


def stratified_counts(k: int, L: int, b: int) -> torch.Tensor:
    """(b,) numbers of masked tokens of a group of b LLaDA samples, given k in 1..L: row i masks
    ((k - 1 + o_i) mod L) + 1 tokens, o_i = round(i * L / b) (half up). For each row this is a bijection of k,
    so with k ~ U{1..L} every row's count is uniform on 1..L and the rows spread evenly over 1..L."""
    i = torch.arange(b)
    offset = (2 * i * L + b) // (2 * b)  # round(i * L / b), half up, in integers
    return (k - 1 + offset) % L + 1


def request_seed(seed: int, *token_lists: Sequence[int]) -> int:
    """A 63-bit seed from the run's seed and a request's tokens (stable across processes and Python runs)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    for tokens in token_lists:
        h.update(b"|" + ",".join(map(str, tokens)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


@torch.no_grad()
def masked_nll(
    model: DiffusionLM, ids: torch.Tensor, target: slice, mask: torch.Tensor
) -> torch.Tensor:
    """Σ over masked target positions of -log p(token | the row with those positions masked).

    Args:
        ids (`torch.LongTensor` of shape `(T,)`): context + continuation (+ anchor) on the model's device.
        target: the continuation's columns.
        mask (`torch.BoolTensor` of shape `(n, len(target))`): positions to mask and score, one row per sample.

    Returns:
        (`torch.DoubleTensor` of shape `(n,)`) the negative log-likelihood sum of each row.
    """
    n = mask.shape[0]
    mask = mask.to(ids.device)
    rows = ids.expand(n, -1).clone()  # (n, T)
    rows[:, target] = torch.where(mask, model.mask_token_id, rows[:, target])
    positions = torch.arange(ids.shape[0], device=ids.device).expand(n, -1)
    logits = model.predict(rows, positions, target).float()  # (n, L, V)
    tokens = ids[target].expand(n, -1)  # (n, L)
    logp = logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (n, L)
    return -(logp.double() * mask).sum(-1)


@torch.no_grad()
def estimate(
    model: DiffusionLM,
    context_ids: Sequence[int],
    continuation_ids: Sequence[int],
    estimator: MonteCarloLikelihood,
    *,
    seed: int,
    anchor_ids: Sequence[int] = (),
    run_rows: RowRunner = _run_all,
) -> float:
    """The Monte-Carlo estimate of log p(continuation | context) (see the module docstring).

    ``anchor_ids`` follow the continuation unmasked (Dream's EOS). ``run_rows(score, n)`` scores the rows;
    by default in groups of ``mc_batch_size`` (one forward pass each), and the glue may split them further:
    the draws are made first, so how rows are split never changes the estimate.
    """
    if not context_ids and model.logit_shift:
        raise ValueError("an empty context: Dream predicts each position from the one before it")
    P, L = len(context_ids), len(continuation_ids)
    ids = torch.tensor([*context_ids, *continuation_ids, *anchor_ids], dtype=torch.long, device=model.device)
    generator = torch.Generator().manual_seed(request_seed(seed, context_ids, continuation_ids))
    mask, weight = estimator.draw(L, generator)
    target = slice(P, P + L)

    def score(lo: int, hi: int) -> torch.Tensor:
        return masked_nll(model, ids, target, mask[lo:hi]).cpu()

    groups = estimator.groups()
    starts = [sum(groups[:g]) for g in range(len(groups))]
    nll = torch.cat([run_rows(lambda lo, hi, s=start: score(s + lo, s + hi), size)
                     for start, size in zip(starts, groups)])
    return -float((weight * nll).mean())


@torch.no_grad()
def greedy_matches(
    model: DiffusionLM, context_ids: Sequence[int], continuation_ids: Sequence[int], anchor_ids: Sequence[int] = ()
) -> bool:
    """Whether decoding the masked continuation one token per step reproduces it (LLaDA's
    ``suffix_greedy_prediction``): start from context + L masks, and at each of L forward passes commit the
    single most confident masked position (argmax token; confidence = its float32 softmax probability; ties
    to the lower position). Costs L forward passes of one row.
    """
    P, L = len(context_ids), len(continuation_ids)
    device = model.device
    x = torch.tensor([[*context_ids, *([model.mask_token_id] * L), *anchor_ids]], dtype=torch.long, device=device)
    positions = torch.arange(x.shape[1], device=device)[None]
    target = slice(P, P + L)
    for _ in range(L):
        logits = model.predict(x, positions, target).float()[0]  # (L, V)
        probs = torch.softmax(logits, dim=-1)
        confidence, tokens = probs.max(-1)  # (L,)
        masked = x[0, target] == model.mask_token_id
        confidence = torch.where(masked, confidence, -1.0)
        best = int(confidence.argmax())  # argmax returns the first maximum: ties go to the lower position
        x[0, P + best] = tokens[best]
    return x[0, target].tolist() == list(continuation_ids)
