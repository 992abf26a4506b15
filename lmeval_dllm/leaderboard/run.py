"""Running the cells of a matrix: one real ``lm_eval`` process per cell, resumable, failures recorded.

Layout of a run directory ``OUT`` (every path deterministic, from the matrix labels)::

    OUT/cells/<task>/<model>/<strategy>--<cache>/     a dLLM cell (``ar`` instead of the last part: an AR baseline)
        cell.json          what the cell is (kind, model, task, strategy, cache, their parameters)
        command.txt        the exact command, shell-quoted (copy-paste it to rerun the cell by hand)
        record.json        the run record: command, start and end time, exit status, package versions and this
                           package's git commit, CPU / GPU names, dtype, seeds (:func:`run_record`)
        lm_eval.log        the command's stdout and stderr
        stats.jsonl        per-request decoding statistics (``stats_path``)
        lm_eval/<model>/results_<time>.json, samples_<task>_<time>.jsonl   lm-eval's own output
        FAILED             only after a failure: exit status, the log's error lines and its last lines

A cell is *finished* when a ``results_*.json`` exists under its ``lm_eval/``; a rerun skips it. A cell that
failed is run again (its ``FAILED`` and partial output are removed first); the other cells do not wait for it.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Callable, Optional

from lmeval_dllm.leaderboard.matrix import Cell, Matrix

FAILED = "FAILED"
RECORD = "record.json"
PACKAGES = ("torch", "transformers", "lm_eval", "lmeval-dllm", "accelerate")
DLLM_DEFAULT_SEED = 1234  # lmeval_dllm.lm.DLLM's `seed` (sampling RNG, likelihood estimates)
TAIL_LINES = 40  # lines of the log kept in FAILED: enough for a Python traceback
_ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): ")  # "ValueError: ...", "[rank0]: OSError: ..."


@dataclass
class Outcome:
    cell: Cell
    status: str  # "done" (ran now), "skipped" (finished before), "failed"
    seconds: float = 0.0
    returncode: Optional[int] = None


def cell_dir(out: str, cell: Cell) -> str:
    return os.path.join(out, "cells", cell.path)


def results_file(directory: str) -> Optional[str]:
    """The newest lm-eval results JSON of a cell directory, or None while the cell is unfinished."""
    found = sorted(glob.glob(os.path.join(directory, "lm_eval", "**", "results_*.json"), recursive=True))
    return found[-1] if found else None


def _executable(name: str) -> str:
    """``name`` from this interpreter's environment (the venv we run in), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)


def build_command(matrix: Matrix, cell: Cell, directory: str, limit: Optional[float] = None,
                  num_processes: Optional[int] = None) -> list[str]:
    """The argv of one cell. ``limit`` / ``num_processes`` (from the command line) override the matrix's.

    One process: ``python -m lm_eval ...`` with the interpreter running us (so the same environment, and our
    ``.pth`` hook registers ``dllm`` / ``hf_ar``). N > 1 processes: ``accelerate launch --multi_gpu
    --num_processes N -m lm_eval ...`` (lm-eval shards the documents by rank; see docs/usage.md).
    """
    processes = num_processes if num_processes is not None else matrix.num_processes
    limit = limit if limit is not None else matrix.limit
    model_args = {**cell.model_args(), "stats_path": os.path.join(directory, "stats.jsonl")}
    batch_size = cell.model.batch_size or matrix.batch_size
    if processes > 1:
        argv = [_executable("accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
                "-m", "lm_eval"]
    else:
        argv = [sys.executable, "-m", "lm_eval"]
    argv += [
        "--model", "dllm" if cell.kind == "dllm" else "hf_ar",
        "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
        "--tasks", cell.task.name,
        "--batch_size", str(batch_size),
        "--output_path", os.path.join(directory, "lm_eval"),
        "--log_samples",
    ]
    for path in matrix.include_path:
        argv += ["--include_path", path]
    if limit is not None:
        argv += ["--limit", f"{limit:g}"]
    return argv + list(matrix.lm_eval_args)


def describe(cell: Cell) -> dict:
    out = {"kind": cell.kind, "model": cell.model.name, "pretrained": cell.model.pretrained, "task": cell.task.name,
           "metric": cell.task.metric, "model_args": cell.model_args()}
    if cell.kind == "dllm":
        out.update(strategy=cell.strategy.name, strategy_name=cell.strategy.strategy,
                   strategy_params=cell.strategy.params, cache=cell.cache.name, cache_name=cell.cache.cache,
                   cache_params=cell.cache.params)
    return out


def run_cell(matrix: Matrix, cell: Cell, out: str, limit: Optional[float] = None,
             num_processes: Optional[int] = None, env: Optional[dict] = None) -> Outcome:
    """Run one cell unless it is finished; never raises for a failing ``lm_eval`` (the outcome says so)."""
    directory = cell_dir(out, cell)
    if results_file(directory):
        return Outcome(cell, "skipped")
    # Leftovers of a failed or interrupted attempt would be mistaken for this attempt's output.
    for stale in (FAILED, "stats.jsonl", "lm_eval.log"):
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    shutil.rmtree(os.path.join(directory, "lm_eval"), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)

    argv = build_command(matrix, cell, directory, limit, num_processes)
    with open(os.path.join(directory, "cell.json"), "w") as f:
        json.dump(describe(cell), f, indent=2)
    with open(os.path.join(directory, "command.txt"), "w") as f:
        f.write(shlex.join(argv) + "\n")
    record = run_record(cell, argv, env)
    _write_json(os.path.join(directory, RECORD), record)
    start = time.perf_counter()
    with open(os.path.join(directory, "lm_eval.log"), "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    finish_record(record, proc.returncode, seconds, directory)
    _write_json(os.path.join(directory, RECORD), record)
    if proc.returncode == 0 and results_file(directory):
        return Outcome(cell, "done", seconds, 0)
    with open(os.path.join(directory, "lm_eval.log"), errors="replace") as log:
        lines = log.readlines()
    # Under accelerate the launcher's own traceback comes last and can push the real error out of the tail.
    errors = list(dict.fromkeys(line for line in lines if _ERROR_LINE.search(line)))[:5]
    with open(os.path.join(directory, FAILED), "w") as f:
        why = f"exit status {proc.returncode}" if proc.returncode else "exit status 0 but no results JSON written"
        f.write(f"{why} after {seconds:.1f} s\ncommand: {shlex.join(argv)}\n")
        if errors:
            f.write("--- error lines ---\n")
            f.writelines(errors)
        f.write("--- last lines of lm_eval.log ---\n")
        f.writelines(lines[-TAIL_LINES:])
    return Outcome(cell, "failed", seconds, proc.returncode)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@functools.lru_cache(maxsize=None)
def _environment() -> dict:
    """What every cell of this run shares: package versions, this package's git commit, the machine."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = _output(["git", "-C", source, "rev-parse", "HEAD"])
    dirty = _output(["git", "-C", source, "status", "--porcelain", "--untracked-files=no"]) if commit else None
    gpus = _output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return {"versions": {"python": platform.python_version(), **versions},
            "git_commit": commit, "git_dirty": bool(dirty) if commit else None,
            "host": platform.node(), "cpu": _cpu_name(), "gpus": gpus.splitlines() if gpus else []}


def _output(argv: list[str]) -> Optional[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(cell: Cell, argv: list[str], env: Optional[dict] = None) -> dict:
    """The record of one run of a cell, before it starts: enough to rerun it and to know where it ran.

    ``dtype``: the ``dtype`` model argument, else what ``--model dllm`` picks for ``auto`` (bfloat16 on a GPU,
    float32 on a CPU) or, for AR cells, lm-eval's ``auto`` (the checkpoint's dtype). ``seed``: the dLLM's
    sampling seed (``seed`` model argument); lm-eval's own seeds are added from its results when it finishes.
    """
    env = os.environ if env is None else env
    machine = _environment()
    args = cell.model_args()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    on_gpu = bool(machine["gpus"]) and visible not in ("", "-1")
    if "dtype" in args:
        dtype = str(args["dtype"])
    elif cell.kind == "dllm":
        dtype = "auto: bfloat16 (GPU)" if on_gpu else "auto: float32 (CPU)"
    else:
        dtype = "auto: the checkpoint's"
    return {"cell": cell.label, "command": shlex.join(argv), "argv": argv, "start": _now(), "end": None,
            "seconds": None, "exit_status": None, **machine, "device": "cuda" if on_gpu else "cpu",
            "cuda_visible_devices": visible, "dtype": dtype,
            "seed": int(args.get("seed", DLLM_DEFAULT_SEED)) if cell.kind == "dllm" else None,
            "omp_num_threads": env.get("OMP_NUM_THREADS")}


def finish_record(record: dict, returncode: int, seconds: float, directory: str) -> dict:
    """The end of the record: end time, exit status, lm-eval's seeds and results file (relative to the cell)."""
    results = results_file(directory)
    record.update(end=_now(), seconds=round(seconds, 3), exit_status=returncode, results=None)
    if results:
        with open(results) as f:
            config = json.load(f).get("config", {})
        record["lm_eval_seeds"] = {k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed",
                                                              "fewshot_seed")}
        record["results"] = os.path.relpath(results, directory)
    return record


def run_matrix(matrix: Matrix, out: str, limit: Optional[float] = None, num_processes: Optional[int] = None,
               env: Optional[dict] = None, echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run every cell in matrix order; failures are reported and the run goes on."""
    cells = matrix.cells()
    if env is None:  # offline-friendly defaults; the caller's own settings win
        env = {"TOKENIZERS_PARALLELISM": "false", **os.environ}
    outcomes = []
    for i, cell in enumerate(cells, 1):
        echo(f"[{i}/{len(cells)}] {cell.label}")
        outcome = run_cell(matrix, cell, out, limit, num_processes, env)
        where = cell_dir(out, cell)
        if not os.path.relpath(where).startswith(".."):  # short when under the working directory
            where = os.path.relpath(where)
        if outcome.status == "skipped":
            echo(f"    finished before, skipped ({where})")
        elif outcome.status == "done":
            echo(f"    done in {outcome.seconds:.1f} s ({where})")
        else:
            echo(f"    FAILED ({outcome.returncode}) after {outcome.seconds:.1f} s: see {where}/{FAILED}")
        outcomes.append(outcome)
    return outcomes
