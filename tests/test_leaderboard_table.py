"""Aggregation (lmeval_dllm/leaderboard/table.py) from small hand-written stored outputs: exact numbers."""

from __future__ import annotations

import csv
import json
import os

import pytest

from lmeval_dllm.leaderboard.matrix import parse_matrix
from lmeval_dllm.leaderboard.run import FAILED, cell_dir
from lmeval_dllm.leaderboard.table import build_rows, markdown, write_tables

MATRIX = """\
tasks: [{task: tg, metric: "exact_match,strict-match"}, other]
models: [{name: tiny, pretrained: tiny-llada}]
strategies:
  - vanilla
  - {name: fast, strategy: vanilla, params: {threshold: 0.9}}
caches: [none, dual]
exclude: [{strategy: vanilla, cache: dual}]
ar_baselines: [{name: gpt2, pretrained: /m/gpt2}]
"""


def stats(n, nfe, tps, step, latency):
    return {"requests": n, "mean_nfe": nfe, "tokens_per_s": tps, "tokens_per_step": step, "mean_latency_s": latency}


def store(out, cell, metrics, dllm_stats, name="results_2026-01-01T00-00-00.json"):
    d = os.path.join(cell_dir(out, cell), "lm_eval", "model")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        json.dump({"results": {cell.task.name: {"alias": cell.task.name, "name": cell.task.name, "sample_len": 40,
                                                **metrics}},
                   "config": {"dllm_stats": dllm_stats}}, f)


@pytest.fixture
def stored(tmp_path):
    m = parse_matrix(MATRIX, str(tmp_path / "m.yaml"))
    out = str(tmp_path / "out")
    cells = {c.label: c for c in m.cells()}
    tg = {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.0801,
          "exact_match,flexible-extract": 0.9, "exact_match_stderr,flexible-extract": 0.05}
    store(out, cells["tg | tiny | vanilla | none"], tg, stats(40, 64.0, 10.0, 0.5, 2.0))
    store(out, cells["tg | tiny | fast | none"], {**tg, "exact_match,strict-match": 0.475},
          stats(40, 16.0, 35.0, 2.0, 0.5))
    store(out, cells["tg | tiny | fast | dual"], {**tg, "exact_match,strict-match": 0.45,
                                                   "exact_match_stderr,strict-match": "N/A"},
          stats(40, 16.5, 80.0, 1.9393939, 0.25))
    store(out, cells["tg | gpt2 | AR"], tg | {"exact_match,strict-match": 0.7}, stats(40, 33.0, 50.0, 0.97, 0.6))
    # "other": the baseline failed, one cell missing, so no speed-up; metric: the first one lm-eval reports
    os.makedirs(cell_dir(out, cells["other | tiny | vanilla | none"]))
    open(os.path.join(cell_dir(out, cells["other | tiny | vanilla | none"]), FAILED), "w").write("exit status 1")
    store(out, cells["other | tiny | fast | none"], {"acc,none": 0.25, "acc_stderr,none": 0.125},
          stats(8, 10.0, 20.0, 3.0, 1.0))
    return m, out


def test_rows(stored):
    m, out = stored
    rows = build_rows(m, out)
    got = [(r.task, r.model, r.strategy, r.cache, r.status, r.metric, r.accuracy, r.accuracy_stderr, r.speedup)
           for r in rows]
    assert got == [
        ("tg", "tiny", "vanilla", "none", "ok", "exact_match,strict-match", 0.5, 0.0801, 1.0),
        ("tg", "tiny", "fast", "none", "ok", "exact_match,strict-match", 0.475, 0.0801, 3.5),
        ("tg", "tiny", "fast", "dual", "ok", "exact_match,strict-match", 0.45, None, 8.0),
        ("tg", "gpt2", "", "", "ok", "exact_match,strict-match", 0.7, 0.0801, None),
        ("other", "tiny", "vanilla", "none", "failed", None, None, None, None),
        ("other", "tiny", "fast", "none", "ok", "acc,none", 0.25, 0.125, None),
        ("other", "tiny", "fast", "dual", "missing", None, None, None, None),
        ("other", "gpt2", "", "", "missing", None, None, None, None),
    ]
    assert rows[0].baseline == "vanilla | none" and rows[3].baseline is None
    assert (rows[2].n, rows[2].nfe, rows[2].tokens_per_s, rows[2].latency_s) == (40, 16.5, 80.0, 0.25)


def test_newest_results_file_wins(stored):
    m, out = stored
    cell = m.cells()[0]
    store(out, cell, {"exact_match,strict-match": 0.55}, stats(40, 60.0, 20.0, 0.5, 2.0),
          name="results_2026-02-01T00-00-00.json")
    rows = build_rows(m, out)
    assert (rows[0].accuracy, rows[0].accuracy_stderr, rows[1].speedup) == (0.55, None, 1.75)


def test_markdown_and_csv(stored):
    m, out = stored
    write_tables(m, out)
    md = open(os.path.join(out, "leaderboard.md")).read().splitlines()
    assert md[:2] == ["# Leaderboard: m", ""]
    assert md[4:12] == [
        "| tg | tiny | vanilla | none | 40 | 50.0 ± 8.0 | 64.0 | 10.0 | 0.50 | 2.000 | 1.00× | 25.0 |  |  |",
        "| tg | tiny | fast | none | 40 | 47.5 ± 8.0 | 16.0 | 35.0 | 2.00 | 0.500 | 3.50× | 95.0 |  |  |",
        "| tg | tiny | fast | dual | 40 | 45.0 | 16.5 | 80.0 | 1.94 | 0.250 | 8.00× | 87.3 |  |  |",
        "| tg | gpt2 | AR (hf) | KV cache | 40 | 70.0 ± 8.0 | 33.0 | 50.0 | 0.97 | 0.600 |  | 67.9 |  |  |",
        "| other | tiny | vanilla | none |  | failed |  |  |  |  |  |  |  |  |",
        "| other | tiny | fast | none | 8 | 25.0 ± 12.5 | 10.0 | 20.0 | 3.00 | 1.000 |  | 75.0 |  |  |",
        "| other | tiny | fast | dual |  | missing |  |  |  |  |  |  |  |  |",
        "| other | gpt2 | AR (hf) | KV cache |  | missing |  |  |  |  |  |  |  |  |",
    ]
    assert md[13].startswith("Speed-up: tokens/s over the `vanilla` + `none` cell of the same model and task (blank: "
                             "AR row, or that cell did not finish). Accuracy: `exact_match,strict-match` on tg; "
                             "`acc,none` on other. TPF: answer tokens per forward pass.")
    # one curve per (task, model, family, cache); single points here: AUP = TPF x accuracy
    assert md[md.index("## Curves") + 3:md.index("## Curves") + 10] == [
        "| --- | --- | --- | --- | --- | ---: |",
        "| tg | tiny | vanilla | none | 0.50, 50.0 | 25.0 |",
        "| tg | tiny | fast | none | 2.00, 47.5 | 95.0 |",
        "| tg | tiny | fast | dual | 1.94, 45.0 | 87.3 |",
        "| tg | gpt2 | AR | KV cache | 0.97, 70.0 | 67.9 |",
        "| other | tiny | fast | none | 3.00, 25.0 | 75.0 |",
        "",
    ]
    assert md[-1].endswith("y_max (the task's best accuracy): 70.0 on tg; 25.0 on other.")
    with open(os.path.join(out, "leaderboard.csv")) as f:
        table = list(csv.DictReader(f))
    assert table[2] == {"task": "tg", "model": "tiny", "kind": "dllm", "strategy": "fast", "cache": "dual",
                        "status": "ok", "metric": "exact_match,strict-match", "accuracy": "0.45",
                        "accuracy_stderr": "", "n": "40", "nfe": "16.5", "tokens_per_s": "80.0",
                        "tokens_per_step": "1.9393939", "latency_s": "0.25", "speedup": "8.0",
                        "baseline": "vanilla | none", "cell": os.path.join("cells", "tg", "tiny", "fast--dual"),
                        "published": "", "delta": "", "published_source": "",
                        "family": "fast", "aup": str(1.9393939 * 45.0), "batch1_checked": "", "batch1_differ": "",
                        "record": ""}
    assert [r["status"] for r in table] == ["ok"] * 4 + ["failed", "ok", "missing", "missing"]


def test_a_metric_that_is_not_reported(stored):
    m, out = stored
    m2 = parse_matrix(MATRIX.replace("exact_match,strict-match", "acc,none"), os.path.join(out, "..", "m.yaml"))
    with pytest.raises(ValueError, match=r"metric 'acc,none' not reported for 'tg'; reported: "
                                         r"exact_match,strict-match, exact_match,flexible-extract"):
        markdown(build_rows(m2, out), m2)


SWEEP = """\
tasks: [tg]
models: [{name: tiny, pretrained: tiny-llada}]
strategies:
  - vanilla
  - {name: fast, strategy: vanilla, params: {threshold: [0.9, 0.5, 0.3]}}
"""


def test_a_sweep_is_one_curve(tmp_path):
    """The AUP of a sweep, by hand: y_max 50 (vanilla's), points by TPF (2.0, 45), (4.0, 40); (6.0, 30) is more
    than 5 below y_1 = 45 and does not count."""
    import math

    m = parse_matrix(SWEEP, str(tmp_path / "m.yaml"))
    out = str(tmp_path / "out")
    vanilla, t9, t5, t3 = m.cells()
    store(out, vanilla, {"acc,none": 0.5}, stats(10, 64.0, 10.0, 0.5, 2.0))
    store(out, t9, {"acc,none": 0.45}, stats(10, 16.0, 35.0, 2.0, 0.5))
    store(out, t5, {"acc,none": 0.40}, stats(10, 8.0, 60.0, 4.0, 0.3))
    store(out, t3, {"acc,none": 0.30}, stats(10, 5.0, 90.0, 6.0, 0.2))
    rows = build_rows(m, out)
    expected = 2.0 * 45 + 0.5 * (4.0 - 2.0) * (40 * math.exp(-3 * (1 - 40 / 50)) + 45 * math.exp(-3 * (1 - 45 / 50)))
    assert [(r.strategy, r.family, r.aup) for r in rows] == [
        ("vanilla", "vanilla", 25.0), ("fast threshold=0.9", "fast", pytest.approx(expected, abs=1e-9)),
        ("fast threshold=0.5", "fast", pytest.approx(expected, abs=1e-9)),
        ("fast threshold=0.3", "fast", pytest.approx(expected, abs=1e-9))]
    assert round(expected, 3) == 145.289
    write_tables(m, out)
    md = open(os.path.join(out, "leaderboard.md")).read()
    assert "| tg | tiny | fast | none | 2.00, 45.0; 4.00, 40.0; 6.00, 30.0 | 145.3 |" in md
