"""Published results (task_configs/published.yaml, lmeval_dllm/leaderboard/published.py) and the leaderboard's
``published`` / ``delta`` columns (lmeval_dllm/leaderboard/table.py): exact rows, exact matches, exact numbers."""

from __future__ import annotations

import csv
import json
import os

import pytest

from lmeval_dllm.leaderboard.matrix import parse_matrix
from lmeval_dllm.leaderboard.published import load_published, match, published_near
from lmeval_dllm.leaderboard.run import cell_dir
from lmeval_dllm.leaderboard.table import build_rows, write_tables

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PUBLISHED = os.path.join(REPO, "task_configs", "published.yaml")
LLADA = "GSAI-ML/LLaDA-8B-Instruct"


@pytest.fixture(scope="module")
def rows():
    return load_published(PUBLISHED)


def test_file_loads_and_names_only_our_tasks(rows):
    from lm_eval.tasks import TaskManager

    assert len(rows) == 76
    tasks = set(TaskManager(include_path=os.path.join(REPO, "task_configs"), include_defaults=False).all_tasks)
    assert {r.task for r in rows} <= tasks
    assert {r.source.key for r in rows} == {"fastdllm_table1", "fastdllm_table2", "dllm_fastdllm", "dllm_llada",
                                             "llada_eval", "llada_paper_poem"}
    assert all(0 < r.accuracy < 100 for r in rows)


@pytest.mark.parametrize("task, cache, args, accuracy, tps", [
    # Fast-dLLM Table 1, LLaDA-8B-Instruct (landscape.md §2b)
    ("gsm8k_fastdllm", "none", {}, 79.3, 6.7),
    ("gsm8k_fastdllm", "prefix", {"threshold": 0.9}, 78.5, 54.4),
    ("gsm8k_fastdllm", "prefix", {"gen_length": 512, "threshold": 0.9}, 77.2, 35.3),
    ("minerva_math_dllm", "none", {"threshold": 0.9}, 33.4, 24.8),
    ("humaneval_fastdllm_instruct", "prefix", {}, 42.7, 40.7),
    ("mbpp_dllm", "none", {"gen_length": 512}, 14.8, 4.3),
])
def test_fastdllm_table1_rows(rows, task, cache, args, accuracy, tps):
    row = match(rows, task=task, pretrained=LLADA, kind="dllm", strategy="vanilla", cache=cache, args=args)
    assert (row.accuracy, row.tokens_per_s, row.source.key) == (accuracy, tps, "fastdllm_table1")
    assert row.source.hardware == "NVIDIA A100 80GB, batch size 1"


def test_other_rows(rows):
    dream = match(rows, task="humaneval_fastdllm", pretrained="/models/Dream-v0-Base-7B", kind="dllm",
                  strategy="vanilla", cache="prefix", args={"alg": "entropy", "threshold": 0.9})
    assert (dream.accuracy, dream.tokens_per_s, dream.source.key) == (54.3, 62.0, "fastdllm_table2")
    cot = match(rows, task="gsm8k_cot_dllm", pretrained=LLADA, kind="dllm", strategy="vanilla", cache="none",
                args={"gen_length": 512, "block_length": 512, "confidence_eos_eot_inf": True}, num_fewshot=5)
    assert cot.accuracy == 74.7 and cot.source.key == "dllm_llada"
    qwen = match(rows, task="reversal_poem_reverse", pretrained="Qwen/Qwen2.5-7B-Instruct", kind="ar")
    assert qwen.accuracy == 38.0
    llada15 = match(rows, task="gsm8k_llada", pretrained="GSAI-ML/LLaDA-1.5", kind="dllm", strategy="vanilla",
                    cache="none", args={"gen_length": 256, "block_length": 16})
    assert llada15.accuracy == 83.8


@pytest.mark.parametrize("change", [
    {"args": {"threshold": 0.8}},                  # another setting
    {"args": {"threshold": 0.9, "block_length": 64}},  # an extra argument
    {"cache": "dual"},
    {"strategy": "klass"},
    {"num_fewshot": 3},
    {"pretrained": "GSAI-ML/LLaDA-8B-Base"},
    {"kind": "ar"},
])
def test_no_match_unless_everything_matches(rows, change):
    cell = {"task": "gsm8k_fastdllm", "pretrained": LLADA, "kind": "dllm", "strategy": "vanilla", "cache": "prefix",
            "args": {"threshold": 0.9}}
    assert match(rows, **cell).accuracy == 78.5
    assert match(rows, **{**cell, **change}) is None


@pytest.mark.parametrize("text, error", [
    ("sources: {s: {title: t, where: w}}\nresults: [{model: m, task: t, accuracy: 1, source: x}]", "unknown source 'x'"),
    ("sources: {s: {title: t, where: w}}\nresults: [{model: m, task: t, source: s}]", "missing 'accuracy'"),
    ("sources: {s: {title: t, where: w}}\nresults: [{model: m, task: t, accuracy: 1, source: s, acc: 2}]",
     r"results\[0\]: unknown key\(s\) acc"),
    ("sources: {s: {title: t, where: w}}\nresults: [{model: m, task: t, accuracy: 1, source: s, kind: x}]",
     "kind must be"),
    ("sources: {s: {title: t, page: 3}}\nresults: []", r"sources.s: unknown key\(s\) page"),
])
def test_bad_files(tmp_path, text, error):
    path = tmp_path / "published.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_published(str(path))


# ------------------------------------------------------------------------------------------------------------------
# The leaderboard's columns

MATRIX = """\
tasks: [{{task: gsm8k_fastdllm, metric: "exact_match,flexible-extract"}}, reversal_poem_forward]
include_path: {include}
models: [{{name: llada, pretrained: /models/LLaDA-8B-Instruct, model_args: {{dtype: bfloat16}}}}]
strategies:
  - vanilla
  - {{name: fast, strategy: vanilla, params: {{threshold: 0.9}}}}
caches: [none, prefix]
ar_baselines: [{{name: qwen, pretrained: Qwen/Qwen2.5-7B-Instruct}}]
"""


def store(out, cell, metrics):
    d = os.path.join(cell_dir(out, cell), "lm_eval", "model")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "results_2026-01-01T00-00-00.json"), "w") as f:
        json.dump({"results": {cell.task.name: metrics}, "config": {"dllm_stats": {"tokens_per_s": 10.0}}}, f)


@pytest.fixture
def run(tmp_path):
    m = parse_matrix(MATRIX.format(include=os.path.join(REPO, "task_configs")), str(tmp_path / "m.yaml"))
    out = str(tmp_path / "out")
    for cell in m.cells():
        if cell.task.name == "gsm8k_fastdllm":
            store(out, cell, {"exact_match,flexible-extract": 0.8})
        elif cell.kind == "ar":
            store(out, cell, {"acc,none": 0.75})
    return m, out


def test_published_and_delta_columns(run):
    m, out = run
    rows = build_rows(m, out)
    got = [(r.task, r.model, r.strategy, r.cache, r.accuracy, r.published, r.delta) for r in rows]
    assert got == [
        ("gsm8k_fastdllm", "llada", "vanilla", "none", 0.8, pytest.approx(0.793), pytest.approx(0.007)),
        ("gsm8k_fastdllm", "llada", "vanilla", "prefix", 0.8, pytest.approx(0.795), pytest.approx(0.005)),
        ("gsm8k_fastdllm", "llada", "fast", "none", 0.8, pytest.approx(0.792), pytest.approx(0.008)),
        ("gsm8k_fastdllm", "llada", "fast", "prefix", 0.8, pytest.approx(0.785), pytest.approx(0.015)),
        ("gsm8k_fastdllm", "qwen", "", "", 0.8, None, None),              # no published AR row for this task
        ("reversal_poem_forward", "llada", "vanilla", "none", None, pytest.approx(0.518), None),   # not run yet: no delta
        ("reversal_poem_forward", "llada", "vanilla", "prefix", None, None, None),
        ("reversal_poem_forward", "llada", "fast", "none", None, None, None),
        ("reversal_poem_forward", "llada", "fast", "prefix", None, None, None),
        ("reversal_poem_forward", "qwen", "", "", 0.75, pytest.approx(0.759), pytest.approx(-0.009)),
    ]
    assert rows[0].published_source == "Fast-dLLM (NVlabs/Fast-dLLM, paper/fast_dllm.pdf, June 2025), Table 1, " \
                                       "LLaDA-8B-Instruct, block 32"


def test_markdown_and_csv_columns(run):
    m, out = run
    write_tables(m, out)
    md = open(os.path.join(out, "leaderboard.md")).read().splitlines()
    assert md[2].endswith("| speed-up | AUP | batch 1 | run | published (%) | delta (pp) |")
    assert md[4] == "| gsm8k_fastdllm | llada | vanilla | none |  | 80.0 |  | 10.0 |  |  | 1.00× |  |  |  | 79.3 | +0.7 |"
    assert md[13] == ("| reversal_poem_forward | qwen | AR (hf) | KV cache |  | 75.0 |  | 10.0 |  |  |  |  |  |  "
                      "| 75.9 | -0.9 |")
    assert [l for l in md if l.startswith("Published (")][0].startswith(
        "Published (task_configs/published.yaml): Fast-dLLM (NVlabs/Fast-dLLM")
    with open(os.path.join(out, "leaderboard.csv")) as f:
        table = list(csv.DictReader(f))
    assert (table[3]["published"], table[3]["delta"][:6]) == ("0.785", "0.0150")
    assert table[4]["published"] == "" and table[4]["published_source"] == ""


def test_num_fewshot_from_lm_eval_args_and_no_file(run, tmp_path):
    m, out = run
    text = MATRIX.format(include=os.path.join(REPO, "task_configs")) + "lm_eval_args: [--num_fewshot, '5']\n"
    five = parse_matrix(text, str(tmp_path / "m5.yaml"))
    # a row without num_fewshot is the task's own count: an explicit --num_fewshot is another setting
    assert all(r.published is None for r in build_rows(five, out))
    assert all(r.published is None for r in build_rows(m, out, published=[]))
    assert published_near([str(tmp_path)]) == []
