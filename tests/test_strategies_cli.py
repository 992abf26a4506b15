"""Each strategy of issue 3 through the real ``lm_eval`` command line, on the tiny checkpoints, at batch sizes 1 and 3.

A tiny random model writes garbage, so these runs check the plumbing and the counts: every request answered once,
the statistics lm-eval reports, each strategy's own arithmetic on them (one token per step, left to right, several
per step), and that batch size 3 gives exactly what batch size 1 gives. The command lines run in one subprocess
(``tests/cli_support.py``: lm-eval's task index is built once instead of once per command line).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from local_tasks import write_generation_task

pytestmark = pytest.mark.slow

DOCS = [("2+2?", "4"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue"), ("3*3?", "9"), ("Up?", "down")]
LIMIT, GEN_LENGTH, BLOCK_LENGTH = 4, 8, 4
# strategy: (tiny family, strategy parameters). {table} is a frequency table built for the Dream tokenizer.
RUNS = {
    "pc_sampler": ("dream", "frequency_table={table},lambd=0.25"),
    "eb_sampler": ("dream", "gamma=6.0,sigma=8.0"),  # the tiny model's entropy is ~5.5 nats: two tokens a step
    "klass": ("llada", "threshold=0.0,kl_threshold=0.5"),
    "ar": ("llada", "num_transfer_tokens=1"),
    # only the late phase can exit: at pass 6 of the 8 planned (6 / 8 >= 0.67), every mask left at once
    "prophet": ("llada", "early_threshold=1e9,mid_threshold=1e9,late_threshold=0.0"),
    # an entropy threshold above every entropy of the tiny model (ln 256 = 5.5 nats): a whole block per pass
    "d3llm": ("dream", "threshold=6.0,block_add_threshold=0.25,decoded_token_threshold=0.5,early_stop=true"),
    # every mask of a block in its first pass (p > 0), then one or two editing passes (any change is an edit)
    "llada21_edit": ("llada", "threshold=0.0,editing_threshold=0.0,max_post_steps=2"),
}


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llada_dir, dream_dir):
    """Write the task and a frequency table, run every (strategy, batch size) command line; {key: output dir}."""
    from lmeval_dllm.samplers.frequency_table import main as build_table

    root = tmp_path_factory.mktemp("strategies_cli")
    (root / "tasks").mkdir()
    write_generation_task(root / "tasks", "dllm_strategy_mini", DOCS, until="###STOP###",
                          doc_to_text="Q: {{question}}\nA:", max_gen_toks=GEN_LENGTH)
    corpus = root / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\nQ: 2+2?\nA: 4\n" * 20)
    table = root / "dream_table.json"
    build_table(["--tokenizer", dream_dir, "--corpus", str(corpus), "--out", str(table)])

    argvs, outs = [], {}
    for name, (family, params) in RUNS.items():
        ckpt = llada_dir if family == "llada" else dream_dir
        for bs in (1, 3):
            out = root / f"{name}-bs{bs}"
            model_args = (f"pretrained={ckpt},strategy={name},gen_length={GEN_LENGTH},block_length={BLOCK_LENGTH},"
                          f"stats_path={out / 'stats.jsonl'},{params.format(table=table)}")
            argvs.append(["--model", "dllm", "--model_args", model_args, "--tasks", "dllm_strategy_mini",
                          "--include_path", str(root / "tasks"), "--limit", str(LIMIT), "--batch_size", str(bs),
                          "--output_path", str(out), "--log_samples"])
            outs[name, bs] = out
    (root / "runs.json").write_text(json.dumps(argvs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    helper = os.path.join(os.path.dirname(__file__), "cli_support.py")
    proc = subprocess.run([sys.executable, helper, str(root / "runs.json")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return outs


def load_run(out):
    error = os.path.join(out, "error.txt")
    if os.path.exists(error):
        pytest.fail(open(error, encoding="utf-8").read()[-6000:])
    (results,) = glob.glob(os.path.join(out, "*", "results_*.json"))
    (samples,) = glob.glob(os.path.join(out, "*", "samples_dllm_strategy_mini_*.jsonl"))
    with open(results, encoding="utf-8") as f:
        return json.load(f), records(samples), records(os.path.join(out, "stats.jsonl"))


def per_step_rule(name, stats):
    """Each strategy's own arithmetic on the per-request statistics."""
    nfe = [r["nfe"] for r in stats]
    committed = [r["committed_tokens"] for r in stats]
    if name in ("pc_sampler", "ar"):  # one token per step
        assert committed == nfe
    elif name == "llada21_edit":  # per block: the fill pass, then 1 to max_post_steps=2 mask-free passes
        blocks = [c // BLOCK_LENGTH for c in committed]
        assert all(c % BLOCK_LENGTH == 0 and 2 * b <= n <= 3 * b for c, b, n in zip(committed, blocks, nfe))
    else:  # several tokens in some steps
        assert all(c >= n for c, n in zip(committed, nfe)) and sum(committed) > sum(nfe)
    if name == "prophet":  # ordinary one-token passes, then the all-in pass 6 (unless a stop token came first)
        assert all(n <= 6 for n in nfe) and 6 in nfe
        assert all(c == (GEN_LENGTH if n == 6 else n) for n, c in zip(nfe, committed))
    if name == "d3llm":  # block 1 in the first pass, block 2 (added once block 1 is done) in the second
        assert all(n <= 2 for n in nfe)
    if name == "ar":  # left to right: a row stops right after committing its first stop token
        assert nfe == [min(r["answer_tokens"] + 1, GEN_LENGTH) for r in stats]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_strategy_through_lm_eval(runs, name):
    answers = {}
    for bs in (1, 3):
        results, samples, stats = load_run(runs[name, bs])
        assert results["config"]["dllm_strategy"] == name
        assert results["n-samples"]["dllm_strategy_mini"] == {"original": len(DOCS), "effective": LIMIT}
        assert results["config"]["dllm_stats"]["requests"] == LIMIT
        assert results["config"]["dllm_stats"]["batches"] == (LIMIT if bs == 1 else 2)
        assert sorted(s["doc_id"] for s in samples) == list(range(LIMIT))
        assert len(stats) == LIMIT and {r["gen_length"] for r in stats} == {GEN_LENGTH}
        assert sorted(r["batch_size"] for r in stats) == ([1] * 4 if bs == 1 else [1, 3, 3, 3])
        per_step_rule(name, stats)
        answers[bs] = ({s["doc_id"]: s["resps"] for s in samples},
                       [(r["nfe"], r["committed_tokens"], r["answer_tokens"]) for r in stats])
    assert answers[3] == answers[1], "batch size 3 must decode exactly as batch size 1"
