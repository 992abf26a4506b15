"""Published results (``task_configs/published.yaml``): what papers report for a model, task and decoding setting,
with the source of each number, and the lookup that sets a leaderboard cell beside its published row.

A row names our task (whose YAML carries the protocol's defaults), the model's hub id, the strategy and cache, and
``args``: the decoding arguments that differ from the task's defaults (``--model_args`` / matrix ``params``), e.g.
``{gen_length: 512, threshold: 0.9}``. Accuracy is in percent as printed in the source; ``tokens_per_s`` and the
source's hardware where the source gives them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

ROW_KEYS = ("model", "task", "kind", "strategy", "cache", "args", "num_fewshot", "accuracy", "tokens_per_s", "source",
            "note")
SOURCE_KEYS = ("title", "where", "hardware")
FILENAME = "published.yaml"


@dataclass(frozen=True)
class Source:
    key: str
    title: str  # the paper or repository
    where: str  # table / file within it
    hardware: Optional[str] = None


@dataclass(frozen=True)
class Published:
    model: str  # hub id, e.g. GSAI-ML/LLaDA-8B-Instruct
    task: str  # our task name (task_configs/)
    accuracy: float  # percent, as published
    source: Source
    kind: str = "dllm"  # "dllm" or "ar"
    strategy: str = "vanilla"
    cache: str = "none"
    args: dict = field(default_factory=dict)  # decoding arguments beyond the task's defaults
    num_fewshot: Optional[int] = None  # None: the task's own
    tokens_per_s: Optional[float] = None
    note: Optional[str] = None

    @property
    def cite(self) -> str:
        return f"{self.source.title}, {self.source.where}"


def load_published(path: str) -> list[Published]:
    """Every row of a published-results file, checked: unknown keys, a missing field or an unknown source are
    errors naming the row."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    sources = {}
    for key, spec in (data.get("sources") or {}).items():
        _check_keys(spec, SOURCE_KEYS, f"{path}: sources.{key}")
        sources[key] = Source(key=key, **spec)
    rows = []
    for i, spec in enumerate(data.get("results") or []):
        where = f"{path}: results[{i}]"
        _check_keys(spec, ROW_KEYS, where)
        for required in ("model", "task", "accuracy", "source"):
            if required not in spec:
                raise ValueError(f"{where}: missing {required!r}")
        if spec["source"] not in sources:
            raise ValueError(f"{where}: unknown source {spec['source']!r}; known: {', '.join(sorted(sources))}")
        if spec.get("kind", "dllm") not in ("dllm", "ar"):
            raise ValueError(f"{where}: kind must be 'dllm' or 'ar', got {spec['kind']!r}")
        rows.append(Published(**{**spec, "source": sources[spec["source"]], "args": dict(spec.get("args") or {})}))
    return rows


def _check_keys(spec, allowed: tuple, where: str) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def published_near(include_path) -> list[Published]:
    """The rows of every ``published.yaml`` in the given task directories (a matrix's ``include_path``)."""
    rows = []
    for directory in include_path:
        path = os.path.join(directory, FILENAME)
        if os.path.isfile(path):
            rows += load_published(path)
    return rows


def _model_key(name: str) -> str:
    """A hub id and a local copy of it match: compared by the last path component, case-insensitively."""
    return os.path.basename(os.path.normpath(name)).lower()


def match(rows: list[Published], *, task: str, pretrained: str, kind: str, strategy: str = "", cache: str = "",
          args: Optional[dict] = None, num_fewshot: Optional[int] = None) -> Optional[Published]:
    """The published row of one cell: same task, model, kind, strategy, cache, few-shot count, and exactly the same
    decoding arguments (``args``: the cell's decoding arguments only, no dtype / batch settings). None if none."""
    for row in rows:
        if (row.task, _model_key(row.model), row.kind) != (task, _model_key(pretrained), kind):
            continue
        if row.num_fewshot != num_fewshot:
            continue
        if kind == "dllm" and ((row.strategy, row.cache) != (strategy, cache) or row.args != (args or {})):
            continue
        return row
    return None
