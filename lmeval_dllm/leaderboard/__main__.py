"""Command line of the leaderboard (``run_eval.sh`` calls ``run``).

    python -m lmeval_dllm.leaderboard run [MATRIX.yaml] [--out DIR] [--limit N] [--num_processes N] [--dry_run]
    python -m lmeval_dllm.leaderboard table [MATRIX.yaml] [--out DIR]     # re-aggregate stored cells only
    python -m lmeval_dllm.leaderboard check MATRIX.yaml                  # parse, check, list the cells
    python -m lmeval_dllm.leaderboard invariance [MATRIX.yaml] [--out DIR] [--sample N]   # batch-1 reruns

Exit status: 0 when every cell finished, 1 when any cell failed (the table lists it) or, for ``invariance``, when
any answer differs at batch size 1; 2 for a bad matrix or bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from lmeval_dllm.leaderboard import DEFAULT_MATRIX
from lmeval_dllm.leaderboard.matrix import MatrixError, load_matrix


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmeval_dllm.leaderboard", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "run every unfinished cell, then write the table and plots"),
                        ("table", "write the table and plots from the cells already stored under --out"),
                        ("check", "parse and check a matrix, list its cells and their commands"),
                        ("invariance", "decode a sample of every finished cell's documents again at batch size 1 "
                                       "and count the answers that differ")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("matrix", nargs="?", default=DEFAULT_MATRIX,
                       help="matrix YAML (default: the bundled tiny leaderboard)")
        s.add_argument("--out", help="run directory (default: leaderboard_runs/<matrix name>)")
        if name in ("run", "check"):
            s.add_argument("--limit", type=_positive(float),
                           help="documents per task (a fraction < 1: share of the task); overrides the matrix")
            s.add_argument("--num_processes", type=_positive(int),
                           help="processes per cell; > 1 runs each cell under `accelerate launch`")
        if name == "invariance":
            s.add_argument("--sample", type=_positive(int), default=None,
                           help="documents per cell (default 8), evenly spaced over the run's documents")
        if name == "run":
            s.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
            s.add_argument("--no_plots", action="store_true", help="table only (no matplotlib needed)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        matrix = load_matrix(args.matrix)
    except MatrixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out or os.path.join("leaderboard_runs", matrix.name))
    if "," in out:  # each cell's stats_path (under OUT) travels inside lm-eval's comma-separated --model_args
        print(f"error: --out {out!r}: the run directory's path cannot contain ','", file=sys.stderr)
        return 2

    from lmeval_dllm.leaderboard.run import build_command, cell_dir, results_file, run_matrix

    cells = matrix.cells()
    if args.command == "check" or (args.command == "run" and args.dry_run):
        for cell in cells:
            directory = cell_dir(out, cell)
            state = "finished" if results_file(directory) else "to run"
            print(f"# {cell.label} ({state})")
            print(shlex.join(build_command(matrix, cell, directory, args.limit, args.num_processes)))
        print(f"# {len(cells)} cells, run directory {out}")
        return 0

    failed = []
    if args.command == "run":
        start = time.perf_counter()
        print(f"leaderboard {matrix.name!r}: {len(cells)} cells -> {out}")
        outcomes = run_matrix(matrix, out, args.limit, args.num_processes)
        failed = [o for o in outcomes if o.status == "failed"]
        print(f"ran {sum(o.status == 'done' for o in outcomes)}, skipped "
              f"{sum(o.status == 'skipped' for o in outcomes)} finished, {len(failed)} failed "
              f"in {time.perf_counter() - start:.0f} s")

    report, differing = None, 0
    if args.command == "invariance":
        from lmeval_dllm.leaderboard import invariance

        start = time.perf_counter()
        reports = invariance.check_matrix(matrix, out, args.sample or invariance.DEFAULT_SAMPLE)
        report = invariance.markdown(reports)
        differing = sum(len(r["differ"]) for r in reports)
        with open(os.path.join(out, "invariance.md"), "w") as f:
            f.write(f"# Batch invariance: {matrix.name}\n\n" + report)
        print(f"checked {len(reports)} finished cells in {time.perf_counter() - start:.0f} s")

    from lmeval_dllm.leaderboard.table import markdown, write_tables

    os.makedirs(out, exist_ok=True)
    try:
        rows = write_tables(matrix, out)
    except ValueError as e:  # a stored result without the matrix's metric for its task
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown(rows, matrix))
    print(f"table: {os.path.join(out, 'leaderboard.md')}, {os.path.join(out, 'leaderboard.csv')}")
    if not getattr(args, "no_plots", False):
        from lmeval_dllm.leaderboard.plots import write_plots

        try:
            for path in write_plots(rows, out):
                print(f"plot: {path}")
        except ImportError as e:  # matplotlib missing: the table is written, say how to get the plots
            print(f"no plots: {e}", file=sys.stderr)
    if report is not None:
        print(f"\n{report}invariance report: {os.path.join(out, 'invariance.md')}")
        if differing:
            return 1
    if failed:
        print(f"\n{len(failed)} cell(s) FAILED:", file=sys.stderr)
        for o in failed:
            print(f"  {o.cell.label}: {os.path.join(cell_dir(out, o.cell), 'FAILED')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
