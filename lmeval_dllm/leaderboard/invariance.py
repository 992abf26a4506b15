"""The batch-invariance check: does an answer depend on the batch it was decoded in?

For every finished cell, a sample of its documents is decoded again one at a time (batch size 1), with the same
model arguments and the same requests (prompt, chat template included, and generation kwargs) that lm-eval logged
for the batched run (``samples_<task>_*.jsonl``, ``--log_samples``), through the same lm-eval model class
(``dllm`` or ``hf_ar``, built as lm-eval's CLI builds it). The report counts the answers (lm-eval's raw
``resps``, before filters) that differ. At temperature 0 every count must be 0: padding, batch composition and
the order of requests must not change what is decoded (Fast-dLLM#39 reports HumanEval accuracy moving with the
batch size in that release).

The check runs in this process, one model at a time, so it costs no ``lm_eval`` start-up per cell. Each cell's
result is stored as ``OUT/cells/<cell>/invariance.json`` (a rerun skips checked cells unless the cell ran again).
"""

from __future__ import annotations

import gc
import glob
import json
import os
import time
from typing import Callable, Optional

from lmeval_dllm.leaderboard.matrix import Cell, Matrix
from lmeval_dllm.leaderboard.run import cell_dir, results_file

INVARIANCE = "invariance.json"
DEFAULT_SAMPLE = 8


def logged_requests(directory: str, task: str) -> dict[int, tuple[str, dict, str]]:
    """{doc_id: (prompt, gen_kwargs, answer)} of a finished cell, from lm-eval's newest samples file."""
    found = sorted(glob.glob(os.path.join(directory, "lm_eval", "**", f"samples_{task}_*.jsonl"), recursive=True))
    if not found:
        raise FileNotFoundError(f"{directory}: no lm-eval samples file for {task!r} (the cell must run with "
                                f"--log_samples, as the leaderboard does)")
    out = {}
    with open(found[-1]) as f:
        for line in f:
            s = json.loads(line)
            args = s["arguments"]["gen_args_0"]
            out.setdefault(s["doc_id"], (args["arg_0"], args["arg_1"], s["resps"][0][0]))
    return out


def spread(ids: list[int], k: int) -> list[int]:
    """``k`` of ``ids`` (sorted), evenly spaced from the first, so the sample spans the run's batches."""
    ids = sorted(ids)
    if k >= len(ids):
        return ids
    return [ids[(i * len(ids)) // k] for i in range(k)]


def _build_model(cell: Cell):
    import lmeval_dllm  # noqa: F401  (registers dllm and hf_ar)
    from lm_eval.api.registry import get_model

    args = ",".join(f"{k}={v}" for k, v in cell.model_args().items())
    return get_model("dllm" if cell.kind == "dllm" else "hf_ar").create_from_arg_string(args, {"batch_size": 1})


def check_cell(matrix: Matrix, cell: Cell, out: str, sample: int = DEFAULT_SAMPLE) -> dict:
    """Decode ``sample`` of the cell's logged requests at batch size 1; write and return the report."""
    from lm_eval.api.instance import Instance

    directory = cell_dir(out, cell)
    logged = logged_requests(directory, cell.task.name)
    ids = spread(list(logged), sample)
    start = time.perf_counter()
    lm = _build_model(cell)
    answers = []
    for doc_id in ids:  # one request per call: batch size 1 whatever the model does with a list
        prompt, gen_kwargs, _ = logged[doc_id]
        request = Instance("generate_until", doc={}, arguments=(prompt, gen_kwargs), idx=0,
                           metadata=(cell.task.name, doc_id, 1))
        answers.extend(lm.generate_until([request], disable_tqdm=True))
    del lm
    gc.collect()
    report = {
        "cell": cell.label,
        "batch_size": cell.model.batch_size or matrix.batch_size,
        "checked": len(ids),
        "documents": len(logged),
        "doc_ids": ids,
        "differ": [d for d, a in zip(ids, answers) if a != logged[d][2]],
        "temperature": sorted({str(logged[d][1].get("temperature", 0)) for d in ids}),
        "results": os.path.relpath(results_file(directory), directory),
        "seconds": round(time.perf_counter() - start, 3),
    }
    with open(os.path.join(directory, INVARIANCE), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report


def stored_report(out: str, cell: Cell) -> Optional[dict]:
    """The stored report of a cell, if it checked the cell's current results."""
    directory = cell_dir(out, cell)
    path, results = os.path.join(directory, INVARIANCE), results_file(directory)
    if results is None or not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    return report if report.get("results") == os.path.relpath(results, directory) else None


def check_matrix(matrix: Matrix, out: str, sample: int = DEFAULT_SAMPLE,
                 echo: Callable[[str], None] = print) -> list[dict]:
    """Check every finished cell not checked yet; returns every finished cell's report, in matrix order."""
    reports = []
    cells = [c for c in matrix.cells() if results_file(cell_dir(out, c))]
    for i, cell in enumerate(cells, 1):
        report = stored_report(out, cell)
        if report is None or report["checked"] < min(sample, report["documents"]):
            report = check_cell(matrix, cell, out, sample)
            how = f"in {report['seconds']:.1f} s"
        else:
            how = "(checked before)"
        echo(f"[{i}/{len(cells)}] {cell.label}: {len(report['differ'])} of {report['checked']} answers differ at "
             f"batch size 1 {how}")
        reports.append(report)
    return reports


def markdown(reports: list[dict]) -> str:
    lines = ["| cell | batch size | documents checked | answers that differ at batch size 1 |",
             "| --- | ---: | ---: | ---: |"]
    for r in reports:
        lines.append(f"| {r['cell']} | {r['batch_size']} | {r['checked']} of {r['documents']} | {len(r['differ'])} |")
    total = sum(len(r["differ"]) for r in reports)
    lines += ["", f"{total} differing answers in {sum(r['checked'] for r in reports)} re-decoded documents over "
                  f"{len(reports)} cells."]
    return "\n".join(lines) + "\n"
