"""End to end on a CPU: the bundled tiny-llada under two strategies and a tiny random GPT-2-shaped AR baseline
(lm-eval's hf model, through ``hf_ar``) on tiny_gsm, through the real ``lm_eval`` processes, to the table and plots."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from lmeval_dllm.leaderboard import __main__ as cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_LLADA = os.path.join(REPO, "lmeval_dllm", "assets", "tiny-llada")


def write_gpt2(directory: str) -> str:
    """A random 2-layer GPT-2 with tiny-llada's tokenizer (and chat template), saved in the HF layout."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=264, n_positions=512, n_embd=32, n_layer=2, n_head=2, bos_token_id=256,
                        eos_token_id=257, pad_token_id=257)
    GPT2LMHeadModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TINY_LLADA, name), directory)
    return directory


@pytest.mark.slow
@pytest.mark.timeout(900)  # the slowest test (73 s on a loaded 2-core CPU): beyond the suite's 300 s
def test_mini_leaderboard(tmp_path):
    gpt2 = write_gpt2(str(tmp_path / "tiny-gpt2"))
    matrix = tmp_path / "mini.yaml"
    matrix.write_text(f"""\
tasks: [{{task: tiny_gsm, metric: "exact_match,strict-match"}}]
include_path: {REPO}/task_configs
models: [{{name: tiny-llada, pretrained: tiny-llada, model_args: {{gen_length: 32}}}}]
strategies:
  - vanilla
  - {{name: threshold=0.5, strategy: vanilla, params: {{threshold: 0.5}}}}
ar_baselines: [{{name: tiny-gpt2, pretrained: {gpt2}}}]
limit: 4
batch_size: 4
lm_eval_args: [--apply_chat_template]
""")
    out = tmp_path / "out"
    assert cli.main(["run", str(matrix), "--out", str(out)]) == 0, [
        p.read_text() for p in out.glob("cells/*/*/*/FAILED")]

    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["strategy"], r["status"], r["n"]) for r in rows] == [
        ("tiny-llada", "vanilla", "ok", "4"), ("tiny-llada", "threshold=0.5", "ok", "4"),
        ("tiny-gpt2", "", "ok", "4")]
    vanilla, fast, ar = rows
    assert float(vanilla["speedup"]) == 1.0 and ar["speedup"] == ""
    assert float(fast["speedup"]) == pytest.approx(float(fast["tokens_per_s"]) / float(vanilla["tokens_per_s"]))
    # one token per step at most for vanilla; the threshold commits several per forward pass
    assert float(vanilla["tokens_per_step"]) <= 1.0 < float(fast["tokens_per_step"])
    assert float(fast["nfe"]) < float(vanilla["nfe"])
    md = (out / "leaderboard.md").read_text()
    assert "| tiny_gsm | tiny-llada | vanilla | none | 4 |" in md and "| 1.00× |" in md
    assert "| tiny_gsm | tiny-gpt2 | AR (hf) | KV cache | 4 |" in md
    for name in ("pareto_tiny_gsm.png", "nfe_tiny_gsm.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the table's numbers are the cells' own (lm-eval's accuracy, our statistics)
    cells = out / "cells" / "tiny_gsm"
    [results] = (cells / "tiny-gpt2" / "ar" / "lm_eval").glob("*/results_*.json")
    results = json.loads(results.read_text())
    assert float(ar["accuracy"]) == results["results"]["tiny_gsm"]["exact_match,strict-match"]
    assert float(ar["tokens_per_s"]) == results["config"]["dllm_stats"]["tokens_per_s"]
    # AR: the task's gen_length (64) is the generation budget; NFE = generated tokens + the stop token's pass
    ar_stats = [json.loads(line) for line in (cells / "tiny-gpt2" / "ar" / "stats.jsonl").read_text().splitlines()]
    assert len(ar_stats) == 4 and {s["gen_length"] for s in ar_stats} == {64}
    assert all(s["nfe"] == min(s["answer_tokens"] + 1, 64) for s in ar_stats)
    # the same prompts (chat template included) went to the dLLM and to the AR baseline
    def prompts(cell):
        [samples] = (cells / cell / "lm_eval").glob("*/samples_tiny_gsm_*.jsonl")
        return {s["doc_id"]: s["arguments"]["gen_args_0"]["arg_0"]
                for s in map(json.loads, samples.read_text().splitlines())}
    assert prompts("tiny-gpt2/ar") == prompts("tiny-llada/vanilla--none")
    assert "<|start_header_id|>user" in prompts("tiny-gpt2/ar")[0]

    # a rerun skips every finished cell and rewrites the same table
    before = (out / "leaderboard.csv").read_text()
    logs = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/*/lm_eval.log")}
    assert cli.main(["run", str(matrix), "--out", str(out), "--no_plots"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/*/lm_eval.log")} == logs
    assert (out / "leaderboard.csv").read_text() == before
