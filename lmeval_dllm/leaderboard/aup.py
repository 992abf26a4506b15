"""AUP (Accuracy Under Parallelism), the score of the d3LLM dLLM leaderboard (hao-ai-lab/d3LLM,
``AUP_leaderboard/aup_utils.py``; https://hao-ai-lab.github.io/blogs/text-diffusion/).

A curve is the points (rho_i, y_i) of one decoding method as a parallelism knob (a threshold, a step budget) is
swept: rho = tokens per forward pass (TPF), y = accuracy in percent. Sorted by rho and kept where
y_i >= y_1 - 5 (y_1: the accuracy at the smallest rho),

    AUP = rho_1 y_1 + 1/2 sum_{i>1} (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})),
    W(y) = min(exp(-3 (1 - y / y_max)), 1),

with y_max the best accuracy of any method on the task: a trapezoid under the accuracy-against-TPF curve in
which accuracy below the task's best is discounted. It depends on TPF, not on wall time, so it does not depend
on the hardware.
"""

from __future__ import annotations

import math

ALPHA = 3.0  # the penalty of W
MAX_DROP = 5.0  # points of accuracy below y_1 that still count


def weight(y: float, y_max: float) -> float:
    """W(y) = min(exp(-3 (1 - y / y_max)), 1)."""
    return min(math.exp(-ALPHA * (1.0 - y / y_max)), 1.0)


def aup(points: list[tuple[float, float]], y_max: float) -> float:
    """AUP of one curve. ``points``: (TPF, accuracy in percent) in any order; ``y_max``: the task's best
    accuracy in percent (over every curve, baselines included).

    Unlike the published script, which asserts that no point is more than 5 points below y_1, points below
    y_1 - 5 are dropped (the rule as the blog states it), so a sweep that goes too far still has a score.
    """
    if not points:
        raise ValueError("AUP of an empty curve")
    if any(not rho > 0 for rho, _ in points):
        raise ValueError(f"AUP needs tokens per forward > 0, got {sorted(rho for rho, _ in points)}")
    if not y_max > 0:
        raise ValueError(f"AUP needs y_max > 0, got {y_max}")
    ordered = sorted(points)
    y_1 = ordered[0][1]
    kept = [(rho, y) for rho, y in ordered if y >= y_1 - MAX_DROP]
    score = kept[0][0] * kept[0][1]
    for (rho_prev, y_prev), (rho, y) in zip(kept, kept[1:]):
        score += 0.5 * (rho - rho_prev) * (y * weight(y, y_max) + y_prev * weight(y_prev, y_max))
    return score
