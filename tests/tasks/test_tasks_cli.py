"""Every task through the real ``lm_eval`` command line, offline, on the tiny checkpoints with local data.

A random tiny model writes garbage, so these runs check the plumbing: every task and the group report their
metrics under the expected names, the prompts reaching the model have each protocol's layout, and the decoding
settings used (``stats_path`` records each request's ``gen_length``) follow the precedence rule.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from tasks_support import GSM8K_MINI, POEM_MINI, SHARED_POEMS, TASK_CONFIGS

pytestmark = pytest.mark.slow

USER, ASSISTANT = "<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>"


def lm_eval(*args: str, cwd: str) -> dict:
    """Run ``python -m lm_eval`` (the same entry point as the ``lm_eval`` script); return the results JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = os.path.join(cwd, "out")
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--include_path", TASK_CONFIGS, "--output_path", out,
                           "--log_samples", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (results,) = glob.glob(os.path.join(out, "*", "results_*.json"))
    with open(results, encoding="utf-8") as f:
        return json.load(f)


def samples(cwd: str, task: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(cwd, "out", "*", f"samples_{task}_*.jsonl"))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_stats(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_all_tasks_on_tiny_llada(llada_dir, tmp_path):
    poems = SHARED_POEMS if os.path.isfile(SHARED_POEMS) else POEM_MINI
    stats = str(tmp_path / "stats.jsonl")
    results = lm_eval(
        "--model", "dllm",
        # max_length: LLaDA's 4-shot prompt is ~4.8k byte-level tokens, past the tiny config's 4096 positions.
        "--model_args", f"pretrained={llada_dir},gen_length=4,block_length=4,max_length=8192,stats_path={stats}",
        "--tasks", "gsm8k_dllm,humaneval_instruct_dllm,reversal_poem", "--limit", "1",
        "--apply_chat_template", "--confirm_run_unsafe_code",
        "--metadata", json.dumps({"gsm8k_path": GSM8K_MINI, "poem_path": poems}),
        cwd=str(tmp_path),
    )
    expected_metrics = {
        "gsm8k_fastdllm": {"exact_match,strict-match", "exact_match,flexible-extract"},
        "gsm8k_llada": {"exact_match,strict-match", "exact_match,flexible-extract"},
        "gsm8k_0shot_dllm": {"exact_match,strict-match", "exact_match,flexible-extract"},
        "gsm8k_cot_dllm": {"exact_match,strict-match", "exact_match,flexible-extract"},  # the gsm8k_dllm tag too
        "humaneval_instruct_dllm": {"pass_at_1,extract-code"},
        "reversal_poem_forward": {"acc,none"},
        "reversal_poem_reverse": {"acc,none"},
        "reversal_poem": {"acc,none"},
    }
    assert set(results["results"]) == set(expected_metrics)
    for task, metrics in expected_metrics.items():
        for metric in metrics:
            assert 0.0 <= results["results"][task][metric] <= 1.0, (task, metric)
    assert {t: n["effective"] for t, n in results["n-samples"].items()} == {t: 1 for t in expected_metrics
                                                                            if t != "reversal_poem"}
    assert results["n-samples"]["humaneval_instruct_dllm"]["original"] == 164  # the bundled file, offline

    # --model_args gen_length=4 won over every task's own gen_length (256, 512, 28).
    records = read_stats(stats)
    # one request per task and document: 4 GSM8K protocols, HumanEval, the 2 poem directions
    assert len(records) == 7 and {r["gen_length"] for r in records} == {4}
    assert results["config"]["dllm_stats"]["requests"] == 7

    # The prompts that reached the model.
    fast = samples(str(tmp_path), "gsm8k_fastdllm")[0]["arguments"]["gen_args_0"]
    assert fast["arg_0"].count(USER) == 1 and fast["arg_0"].count("Question: ") == 6
    assert fast["arg_1"]["gen_length"] == 256 and fast["arg_1"]["block_length"] == 32
    llada = samples(str(tmp_path), "gsm8k_llada")[0]["arguments"]["gen_args_0"]
    assert llada["arg_0"].count(USER) == 5 and llada["arg_0"].count(ASSISTANT) == 5
    assert llada["arg_1"]["confidence_eos_eot_inf"] is True
    poem = samples(str(tmp_path), "reversal_poem_reverse")[0]
    assert poem["arguments"]["gen_args_0"]["arg_0"] == (
        f"<|startoftext|>{USER}\n\n{poem['doc']['second']}的上一句是什么？ 直接输出句子即可。<|eot_id|>{ASSISTANT}\n\n")
    code = samples(str(tmp_path), "humaneval_instruct_dllm")[0]
    assert code["filter"] == "extract-code" and code["filtered_resps"][0].startswith(code["doc"]["prompt"].rstrip())


def test_gen_kwargs_on_tiny_dream(dream_dir, tmp_path):
    """--gen_kwargs replaces the task's gen_length; --model_args block_length beats --gen_kwargs block_length."""
    stats = str(tmp_path / "stats.jsonl")
    results = lm_eval(
        "--model", "dllm", "--model_args", f"pretrained={dream_dir},block_length=7,stats_path={stats}",
        "--tasks", "reversal_poem_forward", "--limit", "2", "--apply_chat_template",
        "--gen_kwargs", "gen_length=14,block_length=14,steps=14",
        "--metadata", json.dumps({"poem_path": POEM_MINI}),
        cwd=str(tmp_path),
    )
    assert set(results["results"]) == {"reversal_poem_forward"}
    assert [r["gen_length"] for r in read_stats(stats)] == [14, 14]
    first = samples(str(tmp_path), "reversal_poem_forward")[0]["arguments"]["gen_args_0"]
    assert first["arg_0"] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                              "床前明月光的下一句是什么？ 直接输出句子即可。<|im_end|>\n<|im_start|>assistant\n")
    assert first["arg_1"] == {"until": [], "do_sample": False, "max_gen_toks": 28, "gen_length": 14,
                              "block_length": 14, "steps": 14, "logits_eos_inf": True}
