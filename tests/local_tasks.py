"""Small local lm-eval tasks of every request type, and a runner for the real `lm_eval` executable (a plain module:
test files import it).

- ``tiny_mc``: ``output_type: multiple_choice`` shaped like ``arc_easy`` ("Question: ...\\nAnswer:", choices,
  ``acc`` / ``acc_norm``): lm-eval sends one ``loglikelihood`` request per choice.
- ``tiny_roll``: ``output_type: loglikelihood_rolling`` shaped like ``wikitext`` (word / byte perplexity).
- ``tiny_gen``: ``output_type: generate_until`` (exact match).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

BIN = os.path.dirname(sys.executable)
LM_EVAL = shutil.which("lm_eval") or os.path.join(BIN, "lm_eval")

# Choice counts 2, 3, 2, 3, 2: two processes (docs 0, 2, 4 and 1, 3) get 6 requests each, so lm-eval pads none.
MC_DOCS = [
    {"question": "Which is a color?", "choices": ["red", "seven"], "label": 0},
    {"question": "What do bees make?", "choices": ["steel", "honey", "rain"], "label": 1},
    {"question": "2 + 2 = ?", "choices": ["3", "4"], "label": 1},
    {"question": "Opposite of up?", "choices": ["down", "left", "\u4e0a"], "label": 0},
    {"question": "Ice is\tfrozen \u2603 ...", "choices": ["water", "fire \x07"], "label": 0},
]
ROLL_DOCS = ["The quick brown fox jumps over the lazy dog.", "Diffusion models denoise: [MASK] -> token.",
             "short", "Unicode \u00e9\u4e2d\U0001F600 and control \x01 chars."]
GEN_DOCS = ["What is 1+1?", "Name a color.", "Say hi.", "Count to three."]


def _write(directory: str, name: str, rows: list[dict], body: str) -> None:
    data = os.path.join(directory, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(directory, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                f"test_split: test\n{body}")


def write_tasks(directory: str) -> str:
    """Write the three tasks' data and YAMLs into ``directory`` (an ``--include_path``)."""
    _write(directory, "tiny_mc", MC_DOCS, """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    _write(directory, "tiny_roll", [{"text": t} for t in ROLL_DOCS], """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""")
    write_generation_task(directory, "tiny_gen", [(q, str(i)) for i, q in enumerate(GEN_DOCS)], max_gen_toks=8)
    return directory


def write_generation_task(directory, name: str, docs, until: str = "\n\n", doc_to_text: str = "{{question}}",
                          **generation_kwargs) -> str:
    """A ``generate_until`` task ``name`` scored by exact match: ``docs`` are (question, answer) pairs, written as
    ``name.jsonl`` next to ``name.yaml`` in ``directory`` (an ``--include_path``). ``generation_kwargs`` go into
    the task's ``generation_kwargs`` after ``until`` (e.g. ``max_gen_toks=16``, ``gen_length=8``). Returns
    ``directory``."""
    kwargs = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in generation_kwargs.items())
    _write(str(directory), name, [{"question": q, "answer": a} for q, a in docs], f"""output_type: generate_until
doc_to_text: {json.dumps(doc_to_text)}
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [{json.dumps(until)}]
{kwargs}metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return str(directory)


# The real CLI entry point (`lm_eval.__main__.cli_evaluate`, what `lm_eval` and `-m lm_eval` run), with two test
# knobs: lm-eval's own task index is skipped (it takes ~10 s to build and our tasks need none of it), and
# `--kill-after-cached N` SIGKILLs the process once N loglikelihood results are in the --use_cache database
# (CacheHook.add_partial commits each one before returning): a hard crash in the middle of a run.
CLI = """
import os, signal, sys

import lm_eval.api.model
import lm_eval.tasks

_init = lm_eval.tasks.TaskManager.__init__
lm_eval.tasks.TaskManager.__init__ = lambda self, *a, **kw: _init(self, *a, **{**kw, "include_defaults": False})

if sys.argv[1] == "--kill-after-cached":
    limit, cached = int(sys.argv[2]), []
    del sys.argv[1:3]
    _add = lm_eval.api.model.CacheHook.add_partial

    def add_partial(self, attr, req, res):
        _add(self, attr, req, res)
        cached.append(attr)
        if cached.count("loglikelihood") == limit:
            os.kill(os.getpid(), signal.SIGKILL)

    lm_eval.api.model.CacheHook.add_partial = add_partial

from lm_eval.__main__ import cli_evaluate

cli_evaluate()
"""


def write_cli(directory: str) -> str:
    path = os.path.join(directory, "lm_eval_cli.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(CLI)
    return path


def env() -> dict:
    """Offline, one thread per process (tiny matmuls; shared test machines)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def run(argv: list[str], cwd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def read_samples(out_dir: str, task: str) -> list[dict]:
    import glob

    [path] = glob.glob(os.path.join(out_dir, "*", f"samples_{task}_*.jsonl"))
    with open(path, encoding="utf-8") as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def read_results(out_dir: str) -> dict:
    import glob

    [path] = glob.glob(os.path.join(out_dir, "*", "results_*.json"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)
