"""The batch-invariance check (lmeval_dllm/leaderboard/invariance.py) with a stand-in model: which documents it
re-decodes, how it counts differing answers, where the report goes (the table's batch-1 column)."""

from __future__ import annotations

import json
import os

import pytest

from lmeval_dllm.leaderboard import __main__ as cli
from lmeval_dllm.leaderboard import invariance
from lmeval_dllm.leaderboard.matrix import parse_matrix
from lmeval_dllm.leaderboard.run import cell_dir
from lmeval_dllm.leaderboard.table import build_rows

MATRIX = """\
tasks: [tg]
models: [{name: tiny, pretrained: tiny-llada}]
strategies: [vanilla]
batch_size: 4
"""


def store(directory, answers):
    d = os.path.join(directory, "lm_eval", "model")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results_1.json"), "w") as f:
        json.dump({"results": {"tg": {"acc,none": 0.5}}, "config": {"dllm_stats": {"tokens_per_step": 1.0}}}, f)
    with open(os.path.join(d, "samples_tg_1.jsonl"), "w") as f:
        for doc_id, answer in answers.items():
            for filt in ("strict", "flexible"):  # lm-eval writes a line per filter: one request each
                f.write(json.dumps({"doc_id": doc_id, "filter": filt, "resps": [[answer]], "arguments": {
                    "gen_args_0": {"arg_0": f"prompt {doc_id}", "arg_1": {"until": ["Q:"], "temperature": 0.0}}}})
                        + "\n")


class FakeLM:
    """Answers "answer <n>" for "prompt <n>"; records the batches it was given."""

    calls: list = []

    def generate_until(self, requests, disable_tqdm=False):
        FakeLM.calls.append([r.arguments for r in requests])
        return [r.arguments[0].replace("prompt", "answer") for r in requests]


def test_spread():
    assert invariance.spread([5, 1, 3, 2, 4, 0, 7, 6], 4) == [0, 2, 4, 6]
    assert invariance.spread(list(range(10)), 3) == [0, 3, 6]
    assert invariance.spread([2, 1], 8) == [1, 2]


def test_check_counts_differences(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(invariance, "_build_model", lambda cell: FakeLM())
    FakeLM.calls = []
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX)
    m = parse_matrix(MATRIX, str(path))
    out = str(tmp_path / "out")
    [cell] = m.cells()
    # the batched run answered doc 4 differently from what batch size 1 gives
    store(cell_dir(out, cell), {i: f"answer {i}" if i != 4 else "other" for i in range(8)})

    assert cli.main(["invariance", str(path), "--out", out, "--sample", "4"]) == 1  # differences: status 1
    # one request per call, the logged prompt and generation kwargs, documents spread over the run
    assert FakeLM.calls == [[(f"prompt {i}", {"until": ["Q:"], "temperature": 0.0})] for i in (0, 2, 4, 6)]
    report = json.loads(open(os.path.join(cell_dir(out, cell), "invariance.json")).read())
    assert {k: report[k] for k in ("cell", "batch_size", "checked", "documents", "doc_ids", "differ")} == {
        "cell": "tg | tiny | vanilla | none", "batch_size": 4, "checked": 4, "documents": 8,
        "doc_ids": [0, 2, 4, 6], "differ": [4]}
    printed = capsys.readouterr().out
    assert "[1/1] tg | tiny | vanilla | none: 1 of 4 answers differ at batch size 1 in " in printed
    assert "| tg | tiny | vanilla | none | 4 | 4 of 8 | 1 |" in printed
    assert open(os.path.join(out, "invariance.md")).read().endswith(
        "1 differing answers in 4 re-decoded documents over 1 cells.\n")
    [row] = build_rows(m, out)
    assert (row.batch1_checked, row.batch1_differ) == (4, 1)

    # a rerun reuses the stored report; new results of the cell make it stale
    assert cli.main(["invariance", str(path), "--out", out, "--sample", "4"]) == 1
    assert len(FakeLM.calls) == 4 and "(checked before)" in capsys.readouterr().out
    os.rename(os.path.join(cell_dir(out, cell), "lm_eval", "model", "results_1.json"),
              os.path.join(cell_dir(out, cell), "lm_eval", "model", "results_2.json"))
    assert invariance.stored_report(out, cell) is None
    [row] = build_rows(m, out)
    assert row.batch1_checked is None


def test_a_cell_without_samples(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lm-eval samples file for 'tg'"):
        invariance.logged_requests(str(tmp_path), "tg")
