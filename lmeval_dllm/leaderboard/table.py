"""Aggregation: one row per cell, from what the cell stored (lm-eval's results JSON), into CSV and Markdown.

Columns (docs/leaderboard.md defines them for readers):

- ``accuracy``, ``accuracy_stderr``: the task's metric and lm-eval's standard error of it, as fractions (CSV)
  or percent (Markdown). The metric is the matrix's ``metric`` for the task, else the first one lm-eval reports.
- ``n``: requests decoded (problems; with several processes, lm-eval's padding copies count too).
- ``nfe``: mean forward passes per request while it was decoding (``dllm_stats.mean_nfe``). AR rows: the
  forward passes of ``generate`` for that request = its generated tokens + the one that produced the stop token.
- ``tokens_per_s``: total answer tokens over total generation wall time (``dllm_stats.tokens_per_s``), the same
  definition for dLLM and AR rows.
- ``tokens_per_step`` (TPF in the Markdown): answer tokens over forward passes, both summed over the requests
  (tokens per forward, the d3LLM leaderboard's parallelism; AR: just under 1).
- ``latency_s``: mean generation wall time per request = each batch's wall time shared equally among its
  requests (``dllm_stats.mean_latency_s``).
- ``speedup``: ``tokens_per_s`` over that of the baseline cell (the matrix's ``baseline``, by default the first
  strategy without cache) of the same model and task; blank for AR rows and when the baseline did not finish.
- ``published``, ``delta``, ``published_source``: the published accuracy of the same model, task, strategy,
  cache and decoding arguments (``published.yaml`` next to the matrix's task configs; see
  lmeval_dllm/leaderboard/published.py), ``accuracy - published``, and where it was published; blank without one.
- ``family``, ``aup``: the curve of the row, (model, strategy family, cache) with "AR" the family of AR rows, and
  its AUP score over its finished rows (:mod:`lmeval_dllm.leaderboard.aup`; y_max: the best accuracy of the task).
- ``batch1_checked``, ``batch1_differ``: documents re-decoded at batch size 1 and answers that differed
  (:mod:`lmeval_dllm.leaderboard.invariance`); blank until ``invariance`` ran.
- ``record``: the cell's run record (``record.json``: command, versions, commit, device, dtype, seeds, times).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

from lmeval_dllm.leaderboard.aup import aup
from lmeval_dllm.leaderboard.invariance import stored_report
from lmeval_dllm.leaderboard.matrix import NO_CACHE, Cell, Matrix
from lmeval_dllm.leaderboard.published import Published, match, published_near
from lmeval_dllm.leaderboard.run import FAILED, RECORD, cell_dir, results_file


@dataclass
class Row:
    task: str
    model: str
    kind: str  # "dllm" or "ar"
    strategy: str  # the matrix label ("" for AR)
    cache: str  # the matrix label ("" for AR)
    status: str  # "ok", "failed", "missing" (not run yet)
    metric: Optional[str] = None
    accuracy: Optional[float] = None
    accuracy_stderr: Optional[float] = None
    n: Optional[int] = None
    nfe: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tokens_per_step: Optional[float] = None
    latency_s: Optional[float] = None
    speedup: Optional[float] = None
    baseline: Optional[str] = None  # "strategy | cache" the speed-up is relative to
    cell: str = ""  # the cell's directory, relative to the run directory
    published: Optional[float] = None  # the published accuracy of this setting (fraction), if any
    delta: Optional[float] = None  # accuracy - published
    published_source: Optional[str] = None
    family: str = ""  # the curve: strategy family (the matrix entry; "AR" for AR rows)
    aup: Optional[float] = None  # AUP of the row's (task, model, family, cache) curve
    batch1_checked: Optional[int] = None  # documents re-decoded at batch size 1
    batch1_differ: Optional[int] = None  # of which answers differed from the batched run
    record: str = ""  # the run record, relative to the run directory


COLUMNS = [f for f in Row.__dataclass_fields__]


def read_cell(out: str, cell: Cell) -> Row:
    """The row of one cell from its stored output (no speed-up yet: that needs the other rows)."""
    directory = cell_dir(out, cell)
    row = Row(task=cell.task.name, model=cell.model.name, kind=cell.kind,
              strategy=cell.strategy.name if cell.strategy else "", cache=cell.cache.name if cell.cache else "",
              status="missing", cell=os.path.relpath(directory, out),
              family=cell.strategy.family if cell.strategy else "AR")
    if os.path.exists(os.path.join(directory, RECORD)):
        row.record = os.path.relpath(os.path.join(directory, RECORD), out)
    path = results_file(directory)
    if path is None:
        row.status = "failed" if os.path.exists(os.path.join(directory, FAILED)) else "missing"
        return row
    with open(path) as f:
        results = json.load(f)
    try:
        metrics = results["results"][cell.task.name]
    except KeyError:
        raise ValueError(f"{path}: no results for task {cell.task.name!r} (tasks reported: "
                         f"{', '.join(results.get('results', {}))})") from None
    row.status = "ok"
    row.metric = cell.task.metric or _first_metric(metrics, path)
    if row.metric not in metrics:
        raise ValueError(f"{path}: metric {row.metric!r} not reported for {cell.task.name!r}; reported: "
                         f"{', '.join(k for k in metrics if ',' in k and '_stderr' not in k)}")
    row.accuracy = float(metrics[row.metric])
    name, _, filt = row.metric.partition(",")
    row.accuracy_stderr = _number(metrics.get(f"{name}_stderr,{filt}"))
    stats = results.get("config", {}).get("dllm_stats", {})
    row.n = stats.get("requests")
    row.nfe = stats.get("mean_nfe")
    row.tokens_per_s = stats.get("tokens_per_s")
    row.tokens_per_step = stats.get("tokens_per_step")
    row.latency_s = stats.get("mean_latency_s")
    report = stored_report(out, cell)
    if report is not None:
        row.batch1_checked, row.batch1_differ = report["checked"], len(report["differ"])
    return row


def _first_metric(metrics: dict, path: str) -> str:
    # Metric keys are "<metric>,<filter>"; the others ("alias", "name", "sample_len") carry no comma.
    for key, value in metrics.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key
    raise ValueError(f"{path}: no numeric metric in {sorted(metrics)}")


def _number(value) -> Optional[float]:
    """lm-eval writes "N/A" for a stderr it could not compute (e.g. one document)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def build_rows(matrix: Matrix, out: str, published: Optional[list[Published]] = None) -> list[Row]:
    """Every cell's row, ordered by task, then dLLM model, strategy, cache, then the AR baselines. ``published``:
    the published results to set beside the cells (default: the ``published.yaml`` of the matrix's include_path)."""
    cells = matrix.cells()
    rows = [read_cell(out, c) for c in cells]
    if published is None:
        published = published_near(matrix.include_path)
    for cell, row in zip(cells, rows):
        _add_published(row, cell, published, _num_fewshot(matrix.lm_eval_args))
    base_strategy, base_cache = matrix.baseline
    reference = {(r.task, r.model): r for r in rows
                 if r.kind == "dllm" and r.strategy == base_strategy and r.cache == base_cache}
    for row in rows:
        if row.kind != "dllm":
            continue
        row.baseline = f"{base_strategy} | {base_cache}"
        ref = reference.get((row.task, row.model))
        if row.tokens_per_s is not None and ref is not None and ref.tokens_per_s:
            row.speedup = row.tokens_per_s / ref.tokens_per_s
    for curve in curves(rows):
        for row in curve["rows"]:
            row.aup = curve["aup"]
    task_order = {t.name: i for i, t in enumerate(matrix.tasks)}
    # sorted() is stable: within a task, the matrix order of the cells (AR baselines come last).
    return sorted(rows, key=lambda r: (task_order[r.task], r.kind == "ar"))


def _decoding_args(cell: Cell) -> dict:
    """The cell's decoding arguments (strategy and cache parameters, the model's decoding keys), not its dtype,
    batch size or other model arguments."""
    from lmeval_dllm.hf_ar import dllm_generation_keys

    decoding = dllm_generation_keys() | {"temperature", "top_p", "top_k"}
    args = {**cell.strategy.params, **cell.cache.params}
    args.update({k: v for k, v in cell.model.model_args.items() if k in decoding})
    return args


def _num_fewshot(lm_eval_args) -> Optional[int]:
    args = list(lm_eval_args)
    for i, arg in enumerate(args):
        if arg == "--num_fewshot" and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--num_fewshot="):
            return int(arg.split("=", 1)[1])
    return None


def _add_published(row: Row, cell: Cell, published: list[Published], num_fewshot: Optional[int]) -> None:
    if not published:
        return
    if cell.kind == "dllm":
        found = match(published, task=cell.task.name, pretrained=cell.model.pretrained, kind="dllm",
                      strategy=cell.strategy.strategy,
                      cache=cell.cache.cache if cell.cache.cache != NO_CACHE else "none",
                      args=_decoding_args(cell), num_fewshot=num_fewshot)
    else:
        found = match(published, task=cell.task.name, pretrained=cell.model.pretrained, kind="ar",
                      num_fewshot=num_fewshot)
    if found is None:
        return
    row.published, row.published_source = found.accuracy / 100, found.cite
    if row.accuracy is not None:
        row.delta = row.accuracy - row.published


def curves(rows: list[Row]) -> list[dict]:
    """The finished rows grouped into curves, (task, model, family, cache), in row order, each with its AUP.
    y_max, W's reference, is the best accuracy of any finished row of the task (AR baselines included), as the
    d3LLM leaderboard takes the best of every method on the task."""
    done = [r for r in rows if r.status == "ok" and r.accuracy is not None and r.tokens_per_step]
    y_max = {}
    for r in done:
        y_max[r.task] = max(y_max.get(r.task, 0.0), 100 * r.accuracy)
    groups = {}
    for r in done:
        groups.setdefault((r.task, r.model, r.family, r.cache), []).append(r)
    out = []
    for (task, model, family, cache), members in groups.items():
        members = sorted(members, key=lambda r: r.tokens_per_step)
        points = [(r.tokens_per_step, 100 * r.accuracy) for r in members]
        score = aup(points, y_max[task]) if y_max[task] > 0 else None
        out.append({"task": task, "model": model, "family": family, "cache": cache, "rows": members,
                    "points": points, "y_max": y_max[task], "aup": score})
    return out


def curves_markdown(rows: list[Row]) -> str:
    """One line per curve: its points (TPF, accuracy) by increasing TPF and its AUP."""
    lines = ["| task | model | curve (strategy family) | cache | points: TPF, accuracy (%) | AUP |",
             "| --- | --- | --- | --- | --- | ---: |"]
    found = curves(rows)
    for c in found:
        points = "; ".join(f"{rho:.2f}, {y:.1f}" for rho, y in c["points"])
        cache = c["cache"] if c["family"] != "AR" else "KV cache"
        lines.append(f"| {c['task']} | {c['model']} | {c['family']} | {cache} | {points} | "
                     f"{_fmt(c['aup'], '{:.1f}')} |")
    y_max = "; ".join(dict.fromkeys(f"{c['y_max']:.1f} on {c['task']}" for c in found))
    lines += ["", "AUP = rho_1 y_1 + 1/2 sum (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})) over the points "
                  "with y >= y_1 - 5, W(y) = min(exp(-3 (1 - y / y_max)), 1), rho = TPF, y = accuracy (%); "
                  f"y_max (the task's best accuracy): {y_max or 'none'}."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: str) -> None:
    """Raw values (fractions, seconds), one row per cell; empty fields where a value does not apply."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})


def markdown(rows: list[Row], matrix: Matrix) -> str:
    """The paper table: accuracy in percent with its standard error, then speed columns."""
    base_strategy, base_cache = matrix.baseline
    with_published = any(r.published is not None for r in rows)  # the two columns only when a cell has a number
    lines = [
        "| task | model | strategy | cache | n | accuracy (%) | NFE | tokens/s | TPF | latency (s) "
        "| speed-up | AUP | batch 1 | run |" + (" published (%) | delta (pp) |" if with_published else ""),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        + (" ---: | ---: |" if with_published else ""),
    ]
    for r in rows:
        strategy, cache = (r.strategy, r.cache) if r.kind == "dllm" else ("AR (hf)", "KV cache")
        record = f"[record]({r.record})" if r.record else ""
        if r.status != "ok":
            cells = [r.task, r.model, strategy, cache, "", r.status, "", "", "", "", "", "", "", record]
        else:
            acc = f"{100 * r.accuracy:.1f}"
            if r.accuracy_stderr is not None:
                acc += f" ± {100 * r.accuracy_stderr:.1f}"
            cells = [r.task, r.model, strategy, cache, _fmt(r.n, "{}"), acc, _fmt(r.nfe, "{:.1f}"),
                     _fmt(r.tokens_per_s, "{:.1f}"), _fmt(r.tokens_per_step, "{:.2f}"),
                     _fmt(r.latency_s, "{:.3f}"), _fmt(r.speedup, "{:.2f}×"), _fmt(r.aup, "{:.1f}"),
                     "" if r.batch1_checked is None else f"{r.batch1_differ}/{r.batch1_checked}", record]
        if with_published:
            cells += [_fmt(None if r.published is None else 100 * r.published, "{:.1f}"),
                      _fmt(None if r.delta is None else 100 * r.delta, "{:+.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    metrics = {}
    for r in rows:
        if r.metric:
            metrics.setdefault(r.task, r.metric)
    notes = [
        "",
        f"Speed-up: tokens/s over the `{base_strategy}` + `{base_cache}` cell of the same model and task "
        "(blank: AR row, or that cell did not finish). "
        "Accuracy: " + "; ".join(f"`{m}` on {t}" for t, m in metrics.items()) + ". "
        "TPF: answer tokens per forward pass. AUP: of the row's curve (below). "
        "Batch 1: answers that differ when a sample of the cell's documents is decoded again at batch size 1, "
        "of those re-decoded (blank: not checked). Run: the cell's run record.",
    ]
    sources = sorted({r.published_source for r in rows if r.published_source})
    if sources:
        notes.append("Published (task_configs/published.yaml): " + "; ".join(sources) + ".")
    return "\n".join(lines + notes) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else spec.format(value)


def write_tables(matrix: Matrix, out: str) -> list[Row]:
    """``OUT/leaderboard.csv`` and ``OUT/leaderboard.md``; returns the rows."""
    rows = build_rows(matrix, out)
    write_csv(rows, os.path.join(out, "leaderboard.csv"))
    with open(os.path.join(out, "leaderboard.md"), "w") as f:
        f.write(f"# Leaderboard: {matrix.name}\n\n" + markdown(rows, matrix) + "\n## Curves\n\n"
                + curves_markdown(rows))
    return rows
