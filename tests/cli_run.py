"""Run the real ``lm_eval`` command line on a tiny checkpoint with small local generation tasks (offline).

A plain module shared by the strategy tests. ``run_lm_eval(tmp_path, model_args)`` writes two JSONL tasks into
``tmp_path`` and runs ``python -m lm_eval --model dllm --batch_size 3 --limit 3`` on both in one subprocess:

- ``smoke_three``: five questions, three used (``--limit 3``): one batch of three prompts of different lengths
  (left-padded);
- ``smoke_one``: one question, with other generation settings (its own ``until``), so lm-eval batches it apart:
  a batch of one.

Both tasks carry a fixed-length protocol (``gen_length``/``block_length`` 8 in their generation kwargs).
One process covers batch sizes 3 and 1 (the decoder sees exactly what ``--batch_size 1`` would give it), at the
cost of one interpreter start. Returns the results JSON, the logged samples per task and the per-request
statistics written through ``stats_path``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from local_tasks import write_generation_task

QUESTIONS = ["What is 2+3?", "Name a colour.", "Say hi", "Count to three, please.", "Why?"]

TASKS = {"smoke_three": (QUESTIONS, "\n\n"), "smoke_one": (["Hello?"], "###")}


def run_lm_eval(tmp_path, model_args: str):
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    for name, (questions, until) in TASKS.items():
        write_generation_task(tasks, name, [(q, "x") for q in questions], until=until, max_gen_toks=8,
                              gen_length=8, block_length=8)
    out, stats = tmp_path / "out", tmp_path / "stats.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "dllm", "--model_args", f"{model_args},stats_path={stats}",
         "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--batch_size", "3", "--limit", "3",
         "--output_path", str(out), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    with open(results, encoding="utf-8") as f:
        results = json.load(f)
    samples = {}
    for name in TASKS:
        (path,) = glob.glob(str(out / "*" / f"samples_{name}_*.jsonl"))
        with open(path, encoding="utf-8") as f:
            samples[name] = [json.loads(line) for line in f]
    with open(stats, encoding="utf-8") as f:
        stats = [json.loads(line) for line in f]
    return results, samples, stats
