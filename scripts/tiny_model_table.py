"""The docs/tiny_model.md table: tiny_gsm accuracy, NFE and tokens/s of the bundled tiny-llada per strategy.

Each row is one ``lm_eval`` command (printed, so the table can be reproduced by hand); a new strategy is one
more line in ``SETTINGS``. Run from the repository root:

    python scripts/tiny_model_table.py --out runs/tiny_table            # all 500 test problems
    python scripts/tiny_model_table.py --out runs/tiny_table --limit 50 --only vanilla threshold_0.9
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys

# name -> extra --model_args (everything else comes from the task: gen_length 64, block_length 32, greedy).
SETTINGS = {
    "vanilla": "",  # one token per step (num_transfer_tokens=1), LLaDA low-confidence remasking
    "threshold_0.9": "threshold=0.9",  # Fast-dLLM
    "threshold_0.5": "threshold=0.5",
    "factor_1.0": "factor=1.0",
    "eb_sampler": "strategy=eb_sampler,gamma=0.01",  # EB-Sampler
    "klass": "strategy=klass",  # KLASS, the release's defaults (threshold 0.9, kl_threshold 0.01, 2 steps)
    "wino": "strategy=wino",  # WINO, the release's defaults (wide_in_thres 0.6, narrow_out_thres 0.9)
    "threshold_0.9_dual": "threshold=0.9,cache=dual",  # Fast-dLLM's dual cache with its threshold
    "hierarchy": "strategy=hierarchy,threshold=0.8,low_threshold=0.5",  # dInfer hierarchical decoding
    "credit": "strategy=credit",  # dInfer credit decoding, the release's defaults (threshold 0.9, alpha 0.7)
    # dInfer's vicinity refresh, with a window (its defaults 0 / 0 / 0 are the dual cache)
    "threshold_0.9_vicinity": "threshold=0.9,cache=vicinity,prefix_look=16,after_look=16,warmup_steps=4",
    "prophet": "strategy=prophet",  # Prophet early commit, the release's gap thresholds 7.5/5.0/2.5
    "prophet_start_0": "strategy=prophet,answer_start=0",  # its gap read over the answer's first 5 tokens
    # the approximate caches of issue 16 at their releases' defaults, beside threshold_0.9_dual
    "threshold_0.9_dkv": "threshold=0.9,cache=dkv",  # dKV-Cache-Decode, cache_reloading_step 8
    "threshold_0.9_elastic": "threshold=0.9,cache=elastic",  # Elastic-Cache, gamma 0.9, window 16
    "threshold_0.9_sparse": "threshold=0.9,cache=sparse",  # Sparse-dLLM, keep_ratio 0.5, kernel 3, delay 1
}


def command(name: str, out: str, limit: int | None, batch_size: int) -> list[str]:
    model_args = ",".join(a for a in ("pretrained=tiny-llada", SETTINGS[name]) if a)
    cmd = ["lm_eval", "--model", "dllm", "--model_args", model_args, "--tasks", "tiny_gsm",
           "--include_path", "task_configs", "--apply_chat_template", "--batch_size", str(batch_size),
           "--output_path", os.path.join(out, name)]
    return cmd + (["--limit", str(limit)] if limit else [])


def read_row(out: str, name: str) -> dict:
    path = sorted(glob.glob(os.path.join(out, name, "**", "results_*.json"), recursive=True))[-1]
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    task, stats = res["results"]["tiny_gsm"], res["config"]["dllm_stats"]
    return {"name": name, "strict": task["exact_match,strict-match"], "flexible": task["exact_match,flexible-extract"],
            "n": stats["requests"], "mean_nfe": stats["mean_nfe"], "tokens_per_s": stats["tokens_per_s"],
            "tokens_per_step": stats["tokens_per_step"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tiny_table")
    ap.add_argument("--limit", type=int, default=None, help="first N test problems (default: all 500)")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--table_only", action="store_true", help="re-read finished runs, run nothing")
    args = ap.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in args.only:
        cmd = command(name, args.out, args.limit, args.batch_size)
        print("$ HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 " + shlex.join(cmd), flush=True)
        if not args.table_only:
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("\n| setting | --model_args | n | exact match (strict) | exact match (flexible) | mean NFE | tokens/step "
          "| tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.only:
        r = read_row(args.out, name)
        args_ = ",".join(a for a in ("pretrained=tiny-llada", SETTINGS[name]) if a)
        print(f"| {name} | `{args_}` | {r['n']} | {100 * r['strict']:.1f}% | {100 * r['flexible']:.1f}% | "
              f"{r['mean_nfe']:.2f} | {r['tokens_per_step']:.2f} | {r['tokens_per_s']:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
