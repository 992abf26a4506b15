"""Plots of a leaderboard (PNG, matplotlib's Agg backend: no display needed).

- ``tpf_<task>.png``: accuracy (%) against tokens per forward pass (TPF), one line per curve (model, strategy
  family, cache: a sweep), its AUP in the legend; AR baselines as filled squares.
- ``pareto_<task>.png``: accuracy (%) against throughput (tokens/s, log scale), the same curves in the same
  colours; the Pareto front (no other cell is both faster and more accurate) is joined by a dashed grey line.
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


def _curves(rows: list[Row], task: str, x: str) -> list[tuple[str, list[Row]]]:
    """(legend label, rows by increasing TPF) of every curve of the task with a finished row that has ``x``."""
    done = [r for r in rows if r.task == task and r.status == "ok" and getattr(r, x)]
    several_models = len({r.model for r in done}) > 1
    groups = {}
    for r in done:
        groups.setdefault((r.model, r.family, r.cache), []).append(r)
    out = []
    for (model, family, cache), members in groups.items():
        label = f"{model}: AR" if family == "AR" else f"{family} | {cache}"
        if several_models and family != "AR":
            label = f"{model}: {label}"
        if members[0].aup is not None:
            label += f" (AUP {members[0].aup:.1f})"
        out.append((label, sorted(members, key=lambda r: (r.tokens_per_step or 0, r.tokens_per_s or 0))))
    return out


def _draw_curves(ax, plt, curves, x: str) -> None:
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (label, members) in enumerate(curves):
        ar = members[0].kind == "ar"
        xs, ys = [getattr(r, x) for r in members], [100 * r.accuracy for r in members]
        # Hollow markers of different shapes: curves through the same spot (a cache that changes no answer)
        # stay visible as nested shapes. AR baselines: filled squares.
        ax.plot(xs, ys, "-" if len(members) > 1 else "", marker="s" if ar else _MARKERS[i % len(_MARKERS)],
                color=colours(i % colours.N), markerfacecolor=None if ar else "none", markeredgewidth=1.6,
                markersize=9 if ar else 8, linewidth=1.4, alpha=0.9, label=label)
        errors = [100 * r.accuracy_stderr if r.accuracy_stderr is not None else 0.0 for r in members]
        if any(errors):
            ax.errorbar(xs, ys, yerr=errors, fmt="none", ecolor=colours(i % colours.N), elinewidth=0.8,
                        capsize=2, alpha=0.35)


def _finish(ax, fig, path: str, title: str, xlabel: str, any_points: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%), bars: ± stderr")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.08, y=0.1)
    if any_points:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)


def plot_tpf(rows: list[Row], task: str, path: str) -> None:
    plt = _pyplot()
    curves = _curves(rows, task, "tokens_per_step")
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    _draw_curves(ax, plt, curves, "tokens_per_step")
    _finish(ax, fig, path, f"{task}: accuracy against parallelism (one line per sweep)",
            "TPF (answer tokens per forward pass)", bool(curves))
    plt.close(fig)


def plot_pareto(rows: list[Row], task: str, path: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    curves = _curves(rows, task, "tokens_per_s")
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    _draw_curves(ax, plt, curves, "tokens_per_s")
    front = pareto_front([(r.tokens_per_s, 100 * r.accuracy) for _, members in curves for r in members])
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="grey", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    # plain numbers at 1, 2, 5 x 10^k: the default minor labels (3x10^1, 4x10^1, ...) collide
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    _finish(ax, fig, path, f"{task}: accuracy against throughput (this machine)",
            "throughput (answer tokens/s, log scale)", bool(curves))
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
    """The plots of every task with a finished cell, under ``OUT/plots/``; returns the paths written."""
    directory = os.path.join(out, "plots")
    os.makedirs(directory, exist_ok=True)
    written = []
    for task in dict.fromkeys(r.task for r in rows):
        if not any(r.task == task and r.status == "ok" for r in rows):
            continue
        if any(r.task == task and r.status == "ok" and r.tokens_per_step for r in rows):
            path = os.path.join(directory, f"tpf_{_file_part(task)}.png")
            plot_tpf(rows, task, path)
            written.append(path)
        path = os.path.join(directory, f"pareto_{_file_part(task)}.png")
        plot_pareto(rows, task, path)
        written.append(path)
        if any(r.task == task and r.status == "ok" and r.kind == "dllm" for r in rows):
            path = os.path.join(directory, f"nfe_{_file_part(task)}.png")
            plot_nfe(rows, task, path)
            written.append(path)
    return written
