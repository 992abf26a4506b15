#!/usr/bin/env bash
# Leaderboard runs: every cell of a matrix (dLLM models x strategies x caches x tasks, plus AR baselines) as one
# real `lm_eval` run, then one comparison table (Markdown + CSV) and plots. docs/leaderboard.md explains all.
#
#   ./run_eval.sh                                   # the bundled tiny leaderboard (CPU, offline, a few minutes)
#   ./run_eval.sh examples/leaderboard_full.yaml    # a matrix file
#   ./run_eval.sh MATRIX.yaml --out runs/full --num_processes 8 --limit 100
#   ./run_eval.sh invariance [MATRIX.yaml] [--out DIR]   # rerun a sample of every cell at batch size 1, count
#                                                       # the answers that differ (must be 0 at temperature 0)
#   ./run_eval.sh table|check [MATRIX.yaml] [...]         # rebuild the table / check a matrix
#
# Rerunning the same command skips finished cells and retries failed ones. Exit status 1 if any cell failed.
# The logic is Python (lmeval_dllm/leaderboard/); this script only picks the interpreter and passes arguments on.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=python  # the active environment's (a virtualenv's python is first on PATH)
command -v "$python" >/dev/null || python=python3

command=run
if [[ $# -gt 0 && ( "$1" == invariance || "$1" == table || "$1" == check ) ]]; then
    command="$1"
    shift
fi
matrix=()
if [[ $# -gt 0 && "$1" != -* ]]; then
    matrix=("$1")
    shift
fi
if [[ ${#matrix[@]} -eq 0 ]]; then
    # The default leaderboard writes next to this script, wherever it is called from.
    if [[ " $* " != *" --out "* && " $* " != *" --out="* ]]; then
        set -- --out "$here/leaderboard_runs/default" "$@"
    fi
    # Its 4 M-parameter model gains little from more CPU threads, and on a shared machine several threads per
    # process thrash: its vanilla cell took 197 s with torch's default threads, 76 s with one (2 shared cores).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec "$python" -m lmeval_dllm.leaderboard "$command" "${matrix[@]}" "$@"
