"""The plain `lm_eval` executable finds `--model dllm` (registration hook) and runs it end to end, offline."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from local_tasks import write_generation_task

LM_EVAL = shutil.which("lm_eval") or os.path.join(os.path.dirname(sys.executable), "lm_eval")
QUESTIONS = ["What is 1+1?", "Name a color.", "Count to three.", "Say hi.", "What is 2+5?"]


def write_task(directory) -> str:
    return write_generation_task(directory, "tiny_echo", [(q, str(i)) for i, q in enumerate(QUESTIONS)],
                                 max_gen_toks=16)


def run_lm_eval(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([LM_EVAL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc


def test_registration_is_lazy():
    """Importing lm-eval's registry registers `dllm` without importing torch or our model code."""
    code = ("import sys, lm_eval.api.registry as r; "
            "print('dllm' in r.model_registry, 'lmeval_dllm.lm' in sys.modules, 'torch' in sys.modules); "
            "print(r.model_registry.get('dllm').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False", "lmeval_dllm.lm"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_lm_eval_cli_end_to_end(family, llada_dir, dream_dir, tmp_path):
    ckpt = llada_dir if family == "llada" else dream_dir
    tasks = write_task(str(tmp_path))
    stats = tmp_path / "stats.jsonl"
    proc = run_lm_eval(
        "--model", "dllm",
        "--model_args", f"pretrained={ckpt},strategy=vanilla,gen_length=16,block_length=8,stats_path={stats}",
        "--tasks", "tiny_echo", "--include_path", tasks, "--limit", "4", "--batch_size", "3",
        "--output_path", str(tmp_path / "out"), "--log_samples", "--apply_chat_template",
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    results = json.load(open(results_file))
    assert results["config"]["dllm_strategy"] == "vanilla"
    assert results["config"]["dllm_stats"]["requests"] == 4
    assert results["config"]["dllm_stats"]["batches"] == 2  # batch_size 3: 3 + 1
    assert "exact_match,none" in results["results"]["tiny_echo"]
    [samples_file] = glob.glob(str(tmp_path / "out" / "*" / "samples_tiny_echo_*.jsonl"))
    samples = [json.loads(line) for line in open(samples_file)]
    assert len(samples) == 4 and all(len(s["resps"][0]) == 1 for s in samples)
    assert len(stats.read_text().splitlines()) == 4
    # the chat template reached the prompt
    marker = "<|start_header_id|>user" if family == "llada" else "<|im_start|>user"
    assert marker in samples[0]["arguments"]["gen_args_0"]["arg_0"]

    # the same requests through the model class in-process give the same answers
    from lm_eval.api.instance import Instance

    from lmeval_dllm.lm import DLLM

    lm = DLLM(pretrained=ckpt, gen_length=16, block_length=8, batch_size=1)
    by_doc = {s["doc_id"]: s for s in samples}
    reqs = [Instance("generate_until", {}, (by_doc[i]["arguments"]["gen_args_0"]["arg_0"],
                                           by_doc[i]["arguments"]["gen_args_0"]["arg_1"]), i) for i in range(4)]
    assert lm.generate_until(reqs, disable_tqdm=True) == [by_doc[i]["resps"][0][0] for i in range(4)]


@pytest.mark.slow
def test_cli_reports_bad_model_args(llada_dir, tmp_path):
    tasks = write_task(str(tmp_path))
    proc = run_lm_eval("--model", "dllm", "--model_args", f"pretrained={llada_dir},treshold=0.9",
                       "--tasks", "tiny_echo", "--include_path", tasks, "--limit", "1", cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "unknown parameter 'treshold' in --model_args for strategy 'vanilla'; did you mean 'threshold'?" in proc.stderr
