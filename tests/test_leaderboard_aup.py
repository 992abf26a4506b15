"""AUP (lmeval_dllm/leaderboard/aup.py) against the published d3LLM leaderboard.

The points are the published ones, hao-ai-lab/d3LLM ``AUP_leaderboard/data_llada.yaml`` (commit e5bfcac), and the
scores those of its leaderboard (``asset/imgs/dllm_leaderboard.png``, the blog's table): GSM8K-CoT, where the best
accuracy of any method is D2F's 74.98, and MATH, where it is Qwen-2.5-7B-it's 41.15.
"""

from __future__ import annotations

import math

import pytest

from lmeval_dllm.leaderboard.aup import aup, weight

GSM8K_Y_MAX, MATH_Y_MAX = 74.98, 41.15


@pytest.mark.parametrize("points, y_max, published", [
    ([(1.0, 74.02), (9.11, 73.09)], GSM8K_Y_MAX, 637.7),   # d3LLM-LLaDA, GSM8K-CoT
    ([(1.0, 74.0), (5.14, 72.63)], GSM8K_Y_MAX, 358.1),    # dParallel-LLaDA, GSM8K-CoT
    ([(1.0, 32.76), (5.74, 30.36)], MATH_Y_MAX, 107.6),    # d3LLM-LLaDA, MATH
    ([(1.0, 32.0), (3.17, 30.18)], MATH_Y_MAX, 64.5),      # dParallel-LLaDA, MATH
])
def test_published_scores(points, y_max, published):
    assert round(aup(points, y_max), 1) == published


def test_worked_example():
    """d3LLM-LLaDA on GSM8K-CoT by hand: rho_1 y_1 + 1/2 (rho_2 - rho_1) (y_2 W(y_2) + y_1 W(y_1))."""
    w1, w2 = math.exp(-3 * (1 - 74.02 / 74.98)), math.exp(-3 * (1 - 73.09 / 74.98))
    assert (round(w1, 4), round(w2, 4)) == (0.9623, 0.9272)
    by_hand = 1.0 * 74.02 + 0.5 * (9.11 - 1.0) * (73.09 * w2 + 74.02 * w1)
    assert aup([(9.11, 73.09), (1.0, 74.02)], GSM8K_Y_MAX) == pytest.approx(by_hand, abs=1e-9)  # any order
    assert by_hand == pytest.approx(637.6549264841269, abs=1e-9)


def test_weight_and_filter():
    assert weight(80.0, 80.0) == 1.0 and weight(90.0, 80.0) == 1.0  # capped at 1
    assert weight(40.0, 80.0) == pytest.approx(math.exp(-1.5))
    # the first point (smallest TPF) sets y_1; points more than 5 below it do not count, wherever they are
    kept = aup([(1.0, 80.0), (2.0, 78.0)], 80.0)
    assert aup([(1.0, 80.0), (1.5, 74.9), (2.0, 78.0), (4.0, 60.0)], 80.0) == kept
    assert aup([(1.0, 80.0), (1.5, 75.0), (2.0, 78.0)], 80.0) != kept  # exactly 5 below still counts
    assert aup([(0.7, 90.0)], 95.0) == pytest.approx(63.0)  # one point: rho_1 y_1, unweighted


def test_bad_curves():
    with pytest.raises(ValueError, match="^AUP of an empty curve$"):
        aup([], 50.0)
    with pytest.raises(ValueError, match=r"^AUP needs tokens per forward > 0, got \[0.0, 2.0\]$"):
        aup([(2.0, 50.0), (0.0, 50.0)], 50.0)
