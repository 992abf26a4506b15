"""The runner (lmeval_dllm/leaderboard/run.py): the lm_eval command of a cell, resumability, failing cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmeval_dllm.leaderboard import __main__ as cli
from lmeval_dllm.leaderboard import run
from lmeval_dllm.leaderboard.matrix import parse_matrix

MATRIX = """\
tasks: [tiny_gsm]
models: [{name: tiny, pretrained: tiny-llada}]
strategies:
  - vanilla
  - {name: fast, strategy: vanilla, params: {threshold: 0.9}}
caches: [none, dual]
exclude: [{strategy: vanilla, cache: dual}]
ar_baselines: [{name: gpt2, pretrained: /models/gpt2, model_args: {dtype: float32}}]
limit: 5
batch_size: 4
lm_eval_args: [--apply_chat_template]
"""


def test_command_of_a_dllm_cell(tmp_path):
    m = parse_matrix(MATRIX, str(tmp_path / "m.yaml"))
    cell = m.cells()[2]  # fast | dual
    d = str(tmp_path / "c")
    assert run.build_command(m, cell, d) == [
        sys.executable, "-m", "lm_eval", "--model", "dllm",
        "--model_args", f"pretrained=tiny-llada,strategy=vanilla,cache=dual,threshold=0.9,stats_path={d}/stats.jsonl",
        "--tasks", "tiny_gsm", "--batch_size", "4", "--output_path", f"{d}/lm_eval", "--log_samples",
        "--limit", "5", "--apply_chat_template"]


def test_command_of_an_ar_cell_and_accelerate(tmp_path):
    m = parse_matrix(MATRIX + "num_processes: 2\n", str(tmp_path / "m.yaml"))
    ar = m.cells()[-1]
    d = str(tmp_path / "c")
    argv = run.build_command(m, ar, d, limit=0.5)
    # N processes: accelerate launch, data parallel; the command line's --limit wins over the matrix's
    assert argv[1:7] == ["launch", "--multi_gpu", "--num_processes", "2", "-m", "lm_eval"]
    assert os.path.basename(argv[0]) == "accelerate"
    assert argv[7:] == ["--model", "hf_ar", "--model_args", f"pretrained=/models/gpt2,dtype=float32,stats_path={d}"
                        f"/stats.jsonl", "--tasks", "tiny_gsm", "--batch_size", "4", "--output_path",
                        f"{d}/lm_eval", "--log_samples", "--limit", "0.5", "--apply_chat_template"]
    # the command line's --num_processes wins over the matrix's; 1 is a plain lm_eval
    assert run.build_command(m, ar, d, num_processes=1)[:3] == [sys.executable, "-m", "lm_eval"]
    assert run.build_command(m, ar, d, num_processes=8)[4] == "8"


# A stand-in for lm_eval: counts its runs, fails for the "fast | none" cell, otherwise writes a results JSON.
FAKE = """
import json, os, sys
d = sys.argv[1]
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(d)))), "runs.txt"), "a") as f:
    f.write(os.path.basename(d) + "\\n")
if d.endswith("fast--none") and not os.environ.get("FIXED"):
    print("Traceback (most recent call last):\\nValueError: boom", file=sys.stderr)
    sys.exit(3)
os.makedirs(os.path.join(d, "lm_eval", "m"))
json.dump({"results": {"tiny_gsm": {"exact_match,none": 0.5, "exact_match_stderr,none": 0.1}},
           "config": {"dllm_stats": {"requests": 4, "tokens_per_s": 10.0}}},
          open(os.path.join(d, "lm_eval", "m", "results_1.json"), "w"))
"""


@pytest.fixture
def fake_lm_eval(monkeypatch):
    monkeypatch.setattr(run, "build_command", lambda matrix, cell, d, limit=None, num_processes=None:
                        [sys.executable, "-c", FAKE, d])


def test_resume_and_failures(tmp_path, fake_lm_eval, monkeypatch, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX)
    out = tmp_path / "out"
    runs = out / "runs.txt"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the record's device: the CPU even where there is a GPU

    # 1. First run: every cell runs; the failing one is recorded and does not stop the others.
    assert cli.main(["run", str(path), "--out", str(out), "--no_plots"]) == 1
    assert runs.read_text().split() == ["vanilla--none", "fast--none", "fast--dual", "ar"]
    failed = out / "cells" / "tiny_gsm" / "tiny" / "fast--none" / "FAILED"
    text = failed.read_text()
    assert text.startswith("exit status 3 after ")
    assert text.endswith("--- error lines ---\nValueError: boom\n--- last lines of lm_eval.log ---\n"
                         "Traceback (most recent call last):\nValueError: boom\n")
    captured = capsys.readouterr()
    assert "1 cell(s) FAILED:\n  tiny_gsm | tiny | fast | none: " in captured.err
    assert "| tiny_gsm | tiny | fast | none |  | failed |  |  |  |  |  |" in captured.out
    # every cell keeps what it is and how it ran
    cell = out / "cells" / "tiny_gsm" / "gpt2" / "ar"
    assert json.loads((cell / "cell.json").read_text())["model_args"] == {"pretrained": "/models/gpt2",
                                                                           "dtype": "float32"}
    assert (cell / "command.txt").read_text().endswith(f" {cell}\n")
    # ... and its run record: the command, times, versions and commit, the machine, dtype and seeds
    record = json.loads((cell / "record.json").read_text())
    assert record["command"] + "\n" == (cell / "command.txt").read_text()
    assert (record["exit_status"], record["results"], record["dtype"], record["seed"]) == (
        0, os.path.join("lm_eval", "m", "results_1.json"), "float32", None)
    assert set(record["versions"]) == {"python", "torch", "transformers", "lm_eval", "lmeval-dllm", "accelerate"}
    assert record["versions"]["lmeval-dllm"] == "0.1.0"
    head = subprocess.run(["git", "-C", os.path.dirname(__file__), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert record["git_commit"] == head and record["start"] <= record["end"]
    assert record["lm_eval_seeds"] == {"random_seed": None, "numpy_seed": None, "torch_seed": None,
                                       "fewshot_seed": None}  # the fake lm_eval writes none
    dllm = json.loads((out / "cells" / "tiny_gsm" / "tiny" / "fast--none" / "record.json").read_text())
    assert (dllm["exit_status"], dllm["results"], dllm["seed"], dllm["device"]) == (3, None, 1234, "cpu")
    assert dllm["dtype"] == "auto: float32 (CPU)"

    # 2. Rerun: finished cells are skipped (not run again), the failed one is retried.
    monkeypatch.setenv("FIXED", "1")
    assert cli.main(["run", str(path), "--out", str(out), "--no_plots"]) == 0
    assert runs.read_text().split() == ["vanilla--none", "fast--none", "fast--dual", "ar", "fast--none"]
    assert not failed.exists()
    assert "finished before, skipped" in capsys.readouterr().out

    # 3. A third run has nothing to do.
    assert cli.main(["run", str(path), "--out", str(out), "--no_plots"]) == 0
    assert len(runs.read_text().split()) == 5


def test_dry_run_and_bad_matrix(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "o"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert out.count(" -m lm_eval --model ") == 4 and out.endswith(f"# 4 cells, run directory {tmp_path}/o\n")
    assert not (tmp_path / "o").exists()
    path.write_text(MATRIX.replace("limit: 5", "limt: 5"))
    assert cli.main(["run", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:9: unknown key 'limt'; did you mean 'limit'? ")
