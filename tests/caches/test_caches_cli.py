"""Every cache with every strategy that can use it, end to end through the real ``lm_eval`` command line, on the
tiny checkpoints, offline, with a small local JSONL task.

One subprocess runs lm-eval's own CLI entry point (``lm_eval.__main__.cli_evaluate``, what the ``lm_eval`` script
calls) once per configuration, so lm-eval is imported once, and without indexing lm-eval's built-in tasks. Each
configuration decodes a padded batch of two and a batch of one. vanilla's modes rotate over the caches so that each
mode meets every cache across the families; every other strategy meets every cache it can use, on LLaDA or Dream in
turn (WINO and DAEDAL only take prefix / dual: the others are refused up front, tests/caches/test_caches_seams.py)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from local_tasks import write_generation_task

pytestmark = pytest.mark.slow

CACHES = ["prefix", "dual", "dllm", "d2cache", "sparse", "elastic", "dkv"]
MODES = ["num_transfer_tokens=2", "steps=8", "threshold=0.3", "factor=2.0"]
# strategy arguments (besides the cache); lengths: gen_length=16, block_length=8 unless the strategy sets its own
STRATEGIES = {
    "pc_sampler": "strategy=pc_sampler,debias=false",
    "eb_sampler": "strategy=eb_sampler,gamma=0.1",
    "klass": "strategy=klass,threshold=0.5",
    "ar": "strategy=ar,num_transfer_tokens=2",
    "wino": "strategy=wino",
    "daedal": "strategy=daedal,initial_gen_length=8,max_gen_length=24,num_check_last_eot=4,block_length=8,threshold=0.5",
}
TAKES = {"wino": ["prefix", "dual"], "daedal": ["prefix", "dual"]}
DRIVER = """
import functools, json, sys
from lm_eval.__main__ import cli_evaluate
from lm_eval.tasks import TaskManager
# Our task is in --include_path; indexing lm-eval's ~14k built-in task files costs ~10 s per run, so leave them out
# (as tests/tasks does). Everything else is the CLI's own code path.
TaskManager.__init__ = functools.partialmethod(TaskManager.__init__, include_defaults=False)
for argv in json.loads(sys.argv[1]):
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
"""
def test_every_cache_and_mode_through_lm_eval(llada_dir, dream_dir, tmp_path):
    write_generation_task(tmp_path, "cache_smoke", [("1+1?", "2"), ("Capital of France?", "Paris"),
                                                    ("Opposite of up?", "down")],
                          doc_to_text="Q: {{question}}\nA:", max_gen_toks=16)
    dirs = {"llada": llada_dir, "dream": dream_dir}
    cells = []  # (family, cache, name, model_args)
    for f, family in enumerate(dirs):
        for c, cache in enumerate(CACHES):
            cells.append((family, cache, "vanilla", f"{MODES[(c + 2 * f) % len(MODES)]},gen_length=16,block_length=8"))
    for i, (name, args) in enumerate(STRATEGIES.items()):
        for c, cache in enumerate(TAKES.get(name, CACHES)):
            lengths = "" if name == "daedal" else ",gen_length=16,block_length=8"
            cells.append((list(dirs)[(i + c) % 2], cache, name, args + lengths))
    runs = []
    for family, cache, name, args in cells:
        out = tmp_path / f"{family}-{cache}-{name}"
        runs.append([
            "--model", "dllm", "--tasks", "cache_smoke", "--include_path", str(tmp_path), "--limit", "3",
            "--output_path", str(out), "--batch_size", "2",
            "--model_args", f"pretrained={dirs[family]},cache={cache},{args},stats_path={out}/stats.jsonl",
        ])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert len(cells) == 2 * len(CACHES) + 4 * len(CACHES) + 2 + 2
    for family, cache, name, _ in cells:
        out = tmp_path / f"{family}-{cache}-{name}"
        (path,) = glob.glob(str(out / "*" / "results_*.json"))
        with open(path, encoding="utf-8") as fh:
            results = json.load(fh)
        assert 0.0 <= results["results"]["cache_smoke"]["exact_match,none"] <= 1.0
        assert (results["config"]["dllm_cache"], results["config"]["dllm_strategy"]) == (cache, name)
        with open(out / "stats.jsonl", encoding="utf-8") as fh:
            stats = [json.loads(line) for line in fh]
        assert [s["batch_size"] for s in stats] == [2, 2, 1], (family, cache, name)
        if name == "daedal":  # a random model is never confident of EOS: every row grows to max_gen_length
            assert [s["gen_length"] for s in stats] == [24, 24, 24], (family, cache)
        else:
            assert {s["gen_length"] for s in stats} == {16}, (family, cache, name)
