"""Run the real ``lm_eval`` command line on a tiny checkpoint with a small local generation task (offline).

A plain module shared by the strategy tests: ``run_lm_eval(tmp_path, model_args, batch_size, limit)`` writes a
JSONL task into ``tmp_path``, runs ``python -m lm_eval --model dllm`` in a subprocess and returns the results JSON,
the logged samples and the per-request statistics (``stats_path``).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

QUESTIONS = ["What is 2+3?", "Name a colour.", "Say hi", "Count to three, please.", "Why?"]

TASK = """task: strategy_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def run_lm_eval(tmp_path, model_args: str, *, batch_size: int, limit: int, max_gen_toks: int = 8):
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS))
    (tasks / "strategy_smoke.yaml").write_text(TASK.format(data=data, max_gen_toks=max_gen_toks))
    out, stats = tmp_path / "out", tmp_path / "stats.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "dllm", "--model_args", f"{model_args},stats_path={stats}",
         "--tasks", "strategy_smoke", "--include_path", str(tasks), "--batch_size", str(batch_size),
         "--limit", str(limit), "--output_path", str(out), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    (samples,) = glob.glob(str(out / "*" / "samples_strategy_smoke_*.jsonl"))
    with open(results, encoding="utf-8") as f:
        results = json.load(f)
    with open(samples, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    with open(stats, encoding="utf-8") as f:
        stats = [json.loads(line) for line in f]
    return results, samples, stats
