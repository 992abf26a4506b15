#!/usr/bin/env bash
# Leaderboard runs: every cell of a matrix (dLLM models x strategies x caches x tasks, plus AR baselines) as one
# real `lm_eval` run, then one comparison table (Markdown + CSV) and plots. docs/leaderboard.md explains all.
#
#   ./run_eval.sh                                   # the bundled tiny leaderboard (CPU, offline, a few minutes)
#   ./run_eval.sh examples/leaderboard_full.yaml    # a matrix file
#   ./run_eval.sh MATRIX.yaml --out runs/full --num_processes 8 --limit 100
#
# Rerunning the same command skips finished cells and retries failed ones. Exit status 1 if any cell failed.
# The logic is Python (lmeval_dllm/leaderboard/); this script only picks the interpreter and passes arguments on.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
command -v "$python" >/dev/null || python=python3

matrix=()
if [[ $# -gt 0 && "$1" != -* ]]; then
    matrix=("$1")
    shift
fi
# The default leaderboard writes next to this script, wherever it is called from.
if [[ ${#matrix[@]} -eq 0 && " $* " != *" --out "* && " $* " != *" --out="* ]]; then
    set -- --out "$here/leaderboard_runs/default" "$@"
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec "$python" -m lmeval_dllm.leaderboard run "${matrix[@]}" "$@"
