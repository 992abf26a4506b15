"""Leaderboard runs: a matrix of models x strategies x caches x tasks (+ AR baselines), each cell one real
``lm_eval`` run, aggregated into one table (CSV, Markdown) and plots. ``python -m lmeval_dllm.leaderboard``;
``run_eval.sh`` at the top of the repository wraps it. See docs/leaderboard.md."""

import os

DEFAULT_MATRIX = os.path.join(os.path.dirname(__file__), "default.yaml")
