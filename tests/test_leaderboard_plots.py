"""Plots (lmeval_dllm/leaderboard/plots.py): the Pareto front, and which files are written for which rows."""

from __future__ import annotations

import os

import pytest

from lmeval_dllm.leaderboard.plots import _curves, pareto_front, write_plots
from lmeval_dllm.leaderboard.table import Row

pytest.importorskip("matplotlib")


def test_pareto_front():
    # (tokens/s, accuracy): (5, 50) is beaten by (10, 60); (30, 60) ties on accuracy but is faster than (10, 60)
    points = [(10, 60), (5, 50), (30, 60), (80, 40), (20, 70), (80, 30)]
    assert pareto_front(points) == [(20, 70), (30, 60), (80, 40)]
    assert pareto_front([]) == []


def row(task, strategy, status="ok", kind="dllm", **kw):
    base = dict(task=task, model="tiny", kind=kind, strategy=strategy, cache="none", status=status,
                accuracy=0.5, accuracy_stderr=0.05, nfe=10.0, tokens_per_s=20.0, tokens_per_step=2.0, family=strategy)
    return Row(**{**base, **kw})


def test_files_written(tmp_path):
    rows = [row("t/a", "vanilla", nfe=64.0, tokens_per_s=10.0), row("t/a", "fast", accuracy=0.4),
            row("t/a", "", kind="ar", model="gpt2", cache="", nfe=33.0, tokens_per_s=50.0, family="AR"),
            row("only-ar", "", kind="ar", model="gpt2", cache="", family="AR"),
            row("not-run", "vanilla", status="missing", accuracy=None, tokens_per_s=None, nfe=None)]
    paths = write_plots(rows, str(tmp_path))
    # a file-system-safe name per task; no NFE plot without a dLLM row, nothing for a task with no finished row
    assert [os.path.basename(p) for p in paths] == ["tpf_t_a.png", "pareto_t_a.png", "nfe_t_a.png",
                                                    "tpf_only-ar.png", "pareto_only-ar.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) < 150_000


def test_one_line_per_curve_with_its_aup():
    rows = [row("t", "fast t=0.9", family="fast", tokens_per_step=4.0, aup=123.45),
            row("t", "fast t=0.5", family="fast", tokens_per_step=2.0, aup=123.45),
            row("t", "fast t=0.9", family="fast", cache="dual", tokens_per_step=4.1, aup=99.0),
            row("t", "", kind="ar", model="gpt2", cache="", family="AR", tokens_per_step=0.97, aup=48.5),
            row("t", "slow", status="failed", accuracy=None)]
    got = [(label, [r.tokens_per_step for r in members]) for label, members in _curves(rows, "t", "tokens_per_step")]
    assert got == [("tiny: fast | none (AUP 123.5)", [2.0, 4.0]), ("tiny: fast | dual (AUP 99.0)", [4.1]),
                   ("gpt2: AR (AUP 48.5)", [0.97])]
