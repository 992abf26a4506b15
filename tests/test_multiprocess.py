"""Data-parallel runs: `accelerate launch --num_processes 2` of the lm_eval CLI on the CPU (gloo) gives exactly
the answers of one process, and the decoding statistics of both processes are gathered and written once."""

from __future__ import annotations

import json
import os
import socket

import pytest
from lm_eval.api.instance import Instance

import local_tasks
from lmeval_dllm.lm import DLLM

MODEL_ARGS = "mc_num=16,mc_batch_size=8,gen_length=8,block_length=8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(llada_dir, tmp_path):
    """Invariant: sharding requests over processes changes nothing in the answers (each likelihood estimate
    draws from its own seeded generator; decoding a prompt does not depend on its batch mates)."""
    tasks = local_tasks.write_tasks(str(tmp_path))
    cli = local_tasks.write_cli(str(tmp_path))
    stats, out = tmp_path / "stats.jsonl", tmp_path / "out"
    # --multi_gpu is accelerate's multi-process launcher (torch.distributed.run); without CUDA our model joins
    # the group on the CPU with gloo. (`accelerate launch --cpu` always starts a single process.)
    proc = local_tasks.run([
        os.path.join(local_tasks.BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), cli,
        "--model", "dllm", "--model_args", f"pretrained={llada_dir},{MODEL_ARGS},stats_path={stats}",
        "--tasks", "tiny_mc,tiny_roll,tiny_gen", "--include_path", tasks, "--batch_size", "2",
        "--output_path", str(out), "--log_samples",
    ], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Building contexts for tiny_mc on rank 1" in proc.stderr  # lm-eval sharded by our rank

    results = local_tasks.read_results(str(out))
    config = results["config"]
    assert config["dllm_processes"] == 2
    # both processes' statistics, written once by the main process
    assert config["dllm_stats"]["requests"] == 4
    assert config["dllm_stats"]["likelihood"]["requests"] == 12 + 4  # 12 choices, 4 documents
    rows = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(rows) == 4 and sorted(r["prompt_tokens"] for r in rows) == sorted(
        len(q.encode()) for q in local_tasks.GEN_DOCS)

    # The same requests in this (single) process.
    lm = DLLM(pretrained=llada_dir, **dict(kv.split("=") for kv in MODEL_ARGS.split(",")))
    mc = local_tasks.read_samples(str(out), "tiny_mc")
    assert [s["doc_id"] for s in mc] == list(range(5))
    reqs = [Instance("loglikelihood", {}, (a["arg_0"], a["arg_1"]), 0) for s in mc for a in s["arguments"].values()]
    expected = lm.loglikelihood(reqs, disable_tqdm=True)
    got = [(float(ll), greedy == "True") for s in mc for [[ll, greedy]] in s["resps"]]
    assert got == expected
    roll = local_tasks.read_samples(str(out), "tiny_roll")
    reqs = [Instance("loglikelihood_rolling", {}, (s["arguments"]["gen_args_0"]["arg_0"],), 0) for s in roll]
    assert [float(s["resps"][0][0]) for s in roll] == lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    gen = local_tasks.read_samples(str(out), "tiny_gen")
    reqs = [Instance("generate_until", {}, (s["arguments"]["gen_args_0"]["arg_0"],
                                            s["arguments"]["gen_args_0"]["arg_1"]), 0) for s in gen]
    assert [s["resps"][0][0] for s in gen] == lm.generate_until(reqs, disable_tqdm=True)
