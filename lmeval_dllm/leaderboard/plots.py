"""Plots of a leaderboard (PNG, matplotlib's Agg backend: no display needed).

- ``pareto_<task>.png``: accuracy (%) against throughput (tokens/s, log scale) for every finished cell of the
  task, one colour and hollow marker shape per cell (named in the legend), AR baselines as filled squares; the Pareto front (no other cell is
  both faster and more accurate) is joined by a dashed line.
- ``nfe_<task>.png``: mean NFE (forward passes per request) of each dLLM cell, one bar per strategy x cache.
"""

from __future__ import annotations

import os
import re

from lmeval_dllm.leaderboard.table import Row


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the leaderboard plots need matplotlib: pip install -e '.[leaderboard]'") from None
    matplotlib.use("Agg")  # files only; never opens a window (CI, servers)
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (x, y) no other point beats in both x and y (higher is better), by increasing x."""
    front, best_y = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front[::-1]


_MARKERS = ("o", "D", "^", "v", "P", "X", "*", "<", ">", "h")


def _file_part(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task)


def _label(row: Row) -> str:
    return f"{row.model}: AR" if row.kind == "ar" else f"{row.strategy} | {row.cache}"


def plot_pareto(rows: list[Row], task: str, path: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    done = [r for r in rows if r.task == task and r.status == "ok" and r.tokens_per_s]
    several_models = len({r.model for r in done}) > 1
    # One colour per cell and a legend, not text beside the points: cells of equal accuracy would overlap.
    colours = plt.get_cmap("tab10" if len(done) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=100)
    for i, r in enumerate(done):
        label = f"{r.model}: {_label(r)}" if several_models and r.kind == "dllm" else _label(r)
        # Hollow markers of different shapes: cells at the same spot (a cache that changes no answer and
        # about the same speed) stay visible as nested shapes. AR baselines: filled squares.
        ar = r.kind == "ar"
        ax.errorbar(r.tokens_per_s, 100 * r.accuracy,
                    yerr=None if r.accuracy_stderr is None else 100 * r.accuracy_stderr,
                    fmt="s" if ar else _MARKERS[i % len(_MARKERS)], color=colours(i % colours.N),
                    markerfacecolor=None if ar else "none", markeredgewidth=1.6, markersize=9 if ar else 10,
                    capsize=3, elinewidth=1, alpha=0.9, label=label)
    front = pareto_front([(r.tokens_per_s, 100 * r.accuracy) for r in done])
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="grey", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    # plain numbers at 1, 2, 5 x 10^k: the default minor labels (3x10^1, 4x10^1, ...) collide
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("throughput (generated tokens/s, log scale)")
    ax.set_ylabel("accuracy (%) ± stderr")
    ax.set_title(f"{task}: accuracy against throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.1, y=0.1)
    if done:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_nfe(rows: list[Row], task: str, path: str) -> None:
    plt = _pyplot()
    done = [r for r in rows if r.task == task and r.status == "ok" and r.kind == "dllm" and r.nfe is not None]
    models = list(dict.fromkeys(r.model for r in done))
    labels = [f"{r.model}: {_label(r)}" if len(models) > 1 else _label(r) for r in done]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.42 * max(len(done), 1)), dpi=100)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    y = list(range(len(done)))[::-1]  # first cell on top
    ax.barh(y, [r.nfe for r in done], color=[colours[r.model] for r in done], height=0.6)
    for yi, r in zip(y, done):
        ax.text(r.nfe, yi, f" {r.nfe:.1f}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ax.set_xlabel("NFE (mean forward passes per request)")
    ax.set_title(f"{task}: forward passes per strategy and cache")
    ax.margins(x=0.12)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(rows: list[Row], out: str) -> list[str]:
    """Both plots for every task with a finished cell, under ``OUT/plots/``; returns the paths written."""
    directory = os.path.join(out, "plots")
    os.makedirs(directory, exist_ok=True)
    written = []
    for task in dict.fromkeys(r.task for r in rows):
        if not any(r.task == task and r.status == "ok" for r in rows):
            continue
        path = os.path.join(directory, f"pareto_{_file_part(task)}.png")
        plot_pareto(rows, task, path)
        written.append(path)
        if any(r.task == task and r.status == "ok" and r.kind == "dllm" for r in rows):
            path = os.path.join(directory, f"nfe_{_file_part(task)}.png")
            plot_nfe(rows, task, path)
            written.append(path)
    return written
