"""The leaderboard matrix: a YAML file naming models, strategies, caches, tasks and AR baselines, expanded into
cells (one ``lm_eval`` run each).

    tasks: [tiny_gsm]                       # or {task: gsm8k_fastdllm, metric: "exact_match,flexible-extract"}
    models:                                 # dLLMs, run with --model dllm
      - {name: tiny-llada, pretrained: tiny-llada}
    strategies:                             # decoding strategies with their parameters
      - vanilla
      - {name: fast-dllm-0.9, strategy: vanilla, params: {threshold: 0.9}}
      - {name: fast-dllm, strategy: vanilla, params: {threshold: [0.5, 0.7, 0.9]}}   # a sweep: three cells
    caches: [none, prefix, dual]            # or {name: dllm-cache, cache: dllm, params: {kp: 50, kr: 7}}
    ar_baselines:                           # AR models, run with --model hf_ar (lm-eval's hf) on the same tasks
      - {name: qwen2.5-7b, pretrained: Qwen/Qwen2.5-7B-Instruct, model_args: {dtype: bfloat16}}

Cells: every model x task x strategy x cache (a strategy's own ``caches:`` list narrows its caches; ``exclude``
drops combinations), then every AR baseline x task. A list of values for a strategy parameter is a sweep: one
strategy per value (per combination, for several lists), labelled ``<name> <param>=<value>``, all of one
*family* (the entry's name; ``family:`` sets it), which is one curve in the table's AUP and the plots.

Everything is checked here, before any run: keys (the fields of the dataclasses below), types, strategy and
cache names, their parameters (every value of a sweep, through the same constructors ``--model dllm`` uses:
:func:`_check_strategy`, :func:`_check_cache`) and every strategy x cache pair. An error names the file, the line
and the entry: ``full.yaml:14: strategies[1]: unknown parameter 'treshold' for strategy 'vanilla'; did you mean
'threshold'? ...``.
"""

from __future__ import annotations

import difflib
import io
import itertools
import os
import re
import shlex
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Optional

import yaml

# --model_args names the runner sets itself
RESERVED_MODEL_ARGS = ("pretrained", "strategy", "cache", "stats_path", "batch_size")
NO_CACHE = "none"
# Metadata of a dataclass field: its YAML key when it is not the field's name (None: not a key of the file), and
# whether an entry must give it.
_NOT_A_KEY = {"key": None}
_REQUIRED = {"required": True}


class MatrixError(ValueError):
    """A problem in a matrix file; the message starts with ``file:line:``."""


# ----------------------------------------------------------------------------------------------------------------
# YAML with line numbers


class _Map(dict):
    """A YAML mapping that remembers where it and each of its keys are (1-based lines)."""

    line: int = 0
    lines: dict


class _Seq(list):
    line: int = 0
    lines: list


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise MatrixError(f"{node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


# ----------------------------------------------------------------------------------------------------------------
# The parsed matrix. The keys a YAML entry may have are the fields of these dataclasses (see `_keys`).


@dataclass(frozen=True)
class Task:
    name: str = field(metadata={"key": "task", **_REQUIRED})
    metric: Optional[str] = None  # "<metric>,<filter>" in lm-eval's results; None: the first one reported


@dataclass(frozen=True)
class Model:
    name: str  # label in the table and in directory names (default: the last part of `pretrained`)
    pretrained: str = field(metadata=_REQUIRED)
    model_args: dict = field(default_factory=dict)
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class Strategy:
    name: str  # the cell's label; a sweep's: "<entry name> <param>=<value> ..."
    strategy: str = field(metadata=_REQUIRED)
    params: dict = field(default_factory=dict)  # one value per parameter (a sweep is expanded)
    caches: Optional[tuple] = None  # cache labels this strategy runs with; None: all
    family: str = ""  # the curve it belongs to: the entry's name (a sweep's strategies share it)
    line: int = field(default=0, compare=False, metadata=_NOT_A_KEY)  # of its matrix entry
    entry: int = field(default=0, compare=False, metadata=_NOT_A_KEY)  # index of its entry in `strategies:`


@dataclass(frozen=True)
class CacheSpec:
    name: str
    cache: str = field(metadata=_REQUIRED)  # "none" = exact computation
    params: dict = field(default_factory=dict)


class Baseline(NamedTuple):
    """The speed-up reference of each model and task: a strategy label and a cache label."""

    strategy: str
    cache: str


@dataclass(frozen=True)
class Exclude:
    """Drops the cells that match every label it gives (a strategy matches by its label or its family)."""

    model: Optional[str] = None
    strategy: Optional[str] = None
    cache: Optional[str] = None
    task: Optional[str] = None

    def matches(self, model: str, strategy: Strategy, cache: str, task: str) -> bool:
        return ((self.model is None or self.model == model) and (self.cache is None or self.cache == cache)
                and (self.task is None or self.task == task)
                and (self.strategy is None or self.strategy in (strategy.name, strategy.family)))


@dataclass(frozen=True)
class Cell:
    """One ``lm_eval`` run. ``kind`` is "dllm" or "ar"; AR cells have no strategy or cache."""

    kind: str
    model: Model
    task: Task
    strategy: Optional[Strategy] = None
    cache: Optional[CacheSpec] = None

    @property
    def path(self) -> str:
        """Directory of the cell under the run's ``cells/``: task / model / strategy--cache (or ``ar``)."""
        leaf = "ar" if self.kind == "ar" else f"{self.strategy.name}--{self.cache.name}"
        return os.path.join(_slug(self.task.name), _slug(self.model.name), _slug(leaf))

    @property
    def label(self) -> str:
        if self.kind == "ar":
            return f"{self.task.name} | {self.model.name} | AR"
        return f"{self.task.name} | {self.model.name} | {self.strategy.name} | {self.cache.name}"

    def model_args(self) -> dict:
        """--model_args of this cell (without stats_path), in a fixed order."""
        out = {"pretrained": self.model.pretrained}
        if self.kind == "dllm":
            out["strategy"] = self.strategy.strategy
            if self.cache.cache != NO_CACHE:
                out["cache"] = self.cache.cache
            out.update(self.strategy.params)
            out.update(self.cache.params)
        out.update(self.model.model_args)
        return out


@dataclass(frozen=True)
class Matrix:
    path: str = field(metadata=_NOT_A_KEY)
    name: str
    tasks: tuple = field(metadata=_REQUIRED)
    models: tuple
    strategies: tuple
    caches: tuple
    ar_baselines: tuple
    baseline: Baseline
    exclude: tuple  # of Exclude
    include_path: tuple  # absolute paths
    lm_eval_args: tuple
    limit: Optional[float]
    batch_size: int
    num_processes: int  # > 1: each cell runs under `accelerate launch --num_processes N`

    def cells(self) -> list[Cell]:
        out = []
        for model in self.models:
            for task in self.tasks:
                for strategy in self.strategies:
                    for cache in self.caches:
                        if strategy.caches is not None and cache.name not in strategy.caches:
                            continue
                        if any(ex.matches(model.name, strategy, cache.name, task.name) for ex in self.exclude):
                            continue
                        out.append(Cell("dllm", model, task, strategy, cache))
        for model in self.ar_baselines:
            for task in self.tasks:
                out.append(Cell("ar", model, task))
        return out


def _keys(cls) -> tuple:
    """The YAML keys of an entry of type ``cls``: its fields, in order, under their ``key`` metadata name."""
    if not hasattr(cls, "__dataclass_fields__"):
        return cls._fields  # a NamedTuple
    return tuple(f.metadata.get("key", f.name) for f in fields(cls) if f.metadata.get("key", f.name))


def _required(cls) -> tuple:
    if not hasattr(cls, "__dataclass_fields__"):
        return ()
    return tuple(f.metadata.get("key", f.name) for f in fields(cls) if f.metadata.get("required"))


# ----------------------------------------------------------------------------------------------------------------
# Parsing and checking


def load_matrix(path: str) -> Matrix:
    """Parse and check the matrix file ``path``; raises :class:`MatrixError` naming the line of any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MatrixError(f"{path}: cannot read the matrix file ({e.strerror})") from None
    return parse_matrix(text, path)


def parse_matrix(text: str, path: str = "<matrix>") -> Matrix:
    stream = io.StringIO(text)
    stream.name = path  # PyYAML puts it in its marks
    loader = _Loader(stream)
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        raise MatrixError(f"{path}:{line} not valid YAML: {e.problem or e.context}") from None
    finally:
        loader.dispose()
    return _Parser(path).matrix(doc)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("_") or "_"


def _did_you_mean(name: str, options) -> str:
    """"; did you mean 'x'? " or "; " (so that what follows reads as a new clause either way)."""
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}? " if close else "; "


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))

    # -- helpers ---------------------------------------------------------------------------------------------

    def error(self, line: int, where: str, message: str) -> MatrixError:
        return MatrixError(f"{self.path}:{line}: {where}: {message}" if where else f"{self.path}:{line}: {message}")

    def entry(self, value, line: int, where: str, cls, shorthand: Optional[str] = None) -> _Map:
        """A mapping whose keys are those of ``cls``; a plain string stands for ``{shorthand: value}``."""
        if shorthand is not None and isinstance(value, str):
            out = _Map({shorthand: value})
            out.line, out.lines = line, {shorthand: line}
            return out
        keys = _keys(cls)
        if not isinstance(value, dict):
            raise self.error(line, where, f"expected a mapping with keys {', '.join(keys)}, got "
                                          f"{_type_name(value)}")
        for key in value:
            if key not in keys:
                raise self.error(value.lines[key], where, f"unknown key {key!r}{_did_you_mean(key, keys)}"
                                                          f"allowed: {', '.join(keys)}")
        for key in _required(cls):
            if key not in value:
                raise self.error(value.line, where, f"missing key {key!r}")
        return value

    def seq(self, value, line: int, where: str) -> _Seq:
        if not isinstance(value, list) or not value:
            raise self.error(line, where, f"expected a non-empty list, got {_type_name(value)}")
        return value

    def string(self, value, line: int, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(line, where, f"expected a non-empty string, got {_type_name(value)}")
        return value

    def integer(self, value, line: int, where: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(line, where, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def args(self, value, line: int, where: str, sweep: bool = False) -> dict:
        """A ``key: value`` mapping that becomes part of ``--model_args`` (scalars, no commas). ``sweep``: a value
        may also be a non-empty list of scalars (one cell per value)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(line, where, f"expected a mapping of parameter: value, got {_type_name(value)}")
        out = {}
        for key, v in value.items():
            at = value.lines[key]
            if key in RESERVED_MODEL_ARGS:
                raise self.error(at, where, f"{key!r} is set by the leaderboard itself; set it elsewhere in the "
                                            f"matrix (reserved: {', '.join(RESERVED_MODEL_ARGS)})")
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise self.error(at, where, f"parameter name {key!r} is not an identifier")
            values = v if sweep and isinstance(v, list) else [v]
            if not values:
                raise self.error(at, where, f"{key}: an empty list sweeps nothing; give at least one value")
            for x in values:
                if isinstance(x, (dict, list)) or x is None:
                    what = "a single value or a list of values" if sweep else "a single value"
                    raise self.error(at, where, f"{key}: expected {what}, got {_type_name(x)}")
                if "," in str(x) or "=" in str(x):
                    raise self.error(at, where, f"{key}={x!r}: lm-eval's --model_args cannot carry ',' or '=' "
                                                f"in a value")
            if len(set(map(str, values))) < len(values):
                raise self.error(at, where, f"{key}: a value is listed twice in {v!r}")
            out[key] = v
        return out

    def unique(self, items, lines, where: str) -> None:
        seen = {}
        for item, line in zip(items, lines):
            for other, other_line in seen.items():
                if _slug(other) == _slug(item.name):
                    what = "the same name" if other == item.name else f"a name with the same directory " \
                                                                       f"({_slug(item.name)!r})"
                    raise self.error(line, where, f"{item.name!r} has {what} as the entry on line "
                                                  f"{other_line}; give each entry its own `name:`")
            seen[item.name] = line

    def labels(self, value, line: int, where: str, known: list, what: str, plural: str) -> str:
        if value not in known:
            raise self.error(line, where, f"{value!r} is not a {what} name of this matrix"
                                          f"{_did_you_mean(value, known)}{plural}: {', '.join(known)}")
        return value

    # -- sections --------------------------------------------------------------------------------------------

    def matrix(self, doc) -> Matrix:
        if doc is None:
            raise MatrixError(f"{self.path}:1: empty matrix; it needs at least `tasks:` and `models:` or "
                              f"`ar_baselines:`")
        doc = self.entry(doc, 1, "", Matrix)
        where = lambda key: doc.lines.get(key, doc.line)  # noqa: E731
        if "models" not in doc and "ar_baselines" not in doc:
            raise self.error(doc.line, "", "nothing to run: give `models:` (dLLMs) and/or `ar_baselines:`")

        tasks = self.tasks(doc["tasks"], where("tasks"))
        models = self.models(doc.get("models"), where("models"), "models")
        ar = self.models(doc.get("ar_baselines"), where("ar_baselines"), "ar_baselines")
        for m, line in zip(ar, doc["ar_baselines"].lines if ar else []):
            if any(m.name == d.name for d in models):
                raise self.error(line, "ar_baselines", f"{m.name!r} is also the name of a dLLM model; "
                                                       f"give the AR baseline its own `name:`")
        caches = self.caches(doc.get("caches"), where("caches"))
        strategies = self.strategies(doc.get("strategies"), where("strategies"), caches)
        exclude = self.exclude(doc.get("exclude"), where("exclude"), models, strategies, caches, tasks)
        self.check_pairs(strategies, caches, exclude)
        baseline = self.baseline(doc.get("baseline"), where("baseline"), strategies, caches)

        include = doc.get("include_path", [])
        include = [include] if isinstance(include, str) else include
        if not isinstance(include, list):
            raise self.error(where("include_path"), "include_path", "expected a path or a list of paths")
        include_path = []
        for i, p in enumerate(include):
            p = self.string(p, include.lines[i] if isinstance(include, _Seq) else where("include_path"),
                            "include_path")
            full = os.path.normpath(os.path.join(self.directory, os.path.expanduser(p)))
            if not os.path.isdir(full):
                raise self.error(where("include_path"), "include_path",
                                 f"{p!r} is not a directory (relative paths are relative to the matrix file: "
                                 f"{full})")
            include_path.append(full)

        extra = doc.get("lm_eval_args", [])
        if isinstance(extra, str):
            extra = shlex.split(extra)
        if not isinstance(extra, list) or not all(isinstance(a, (str, int, float)) for a in extra):
            raise self.error(where("lm_eval_args"), "lm_eval_args", "expected a list of arguments or one string")
        extra = [str(a) for a in extra]
        for a in extra:
            flag = a.split("=")[0]
            if flag in ("--model", "--model_args", "--tasks", "--output_path", "--limit", "--batch_size",
                        "--include_path"):
                raise self.error(where("lm_eval_args"), "lm_eval_args",
                                 f"{flag} is set by the leaderboard; use the matrix keys (models, tasks, "
                                 f"limit, batch_size, include_path) instead")

        limit = doc.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise self.error(where("limit"), "limit", f"expected a number > 0 (documents, or a fraction < 1), "
                                                      f"got {limit!r}")
        batch_size = self.integer(doc.get("batch_size", 1), where("batch_size"), "batch_size")
        num_processes = self.integer(doc.get("num_processes", 1), where("num_processes"), "num_processes")
        name = self.string(doc.get("name", os.path.splitext(os.path.basename(self.path))[0]), where("name"),
                           "name")
        return Matrix(path=os.path.abspath(self.path), name=name, tasks=tuple(tasks), models=tuple(models),
                      strategies=tuple(strategies), caches=tuple(caches), ar_baselines=tuple(ar),
                      baseline=baseline, exclude=tuple(exclude), include_path=tuple(include_path),
                      lm_eval_args=tuple(extra), limit=limit, batch_size=batch_size,
                      num_processes=num_processes)

    def tasks(self, value, line: int) -> list[Task]:
        out = []
        for i, item in enumerate(self.seq(value, line, "tasks")):
            where, at = f"tasks[{i}]", value.lines[i]
            item = self.entry(item, at, where, Task, shorthand="task")
            name = self.string(item["task"], at, where + ".task")
            if "," in name:
                raise self.error(at, where, f"one task per entry, got {name!r}")
            metric = item.get("metric")
            if metric is not None:
                metric = self.string(metric, at, where + ".metric")
                if "," not in metric:
                    raise self.error(at, where + ".metric",
                                     f"{metric!r}: give lm-eval's results key '<metric>,<filter>', e.g. "
                                     f"'exact_match,strict-match' or 'acc,none'")
            if any(t.name == name for t in out):
                raise self.error(at, where, f"task {name!r} is listed twice")
            out.append(Task(name, metric))
        return out

    def models(self, value, line: int, key: str) -> list[Model]:
        if value is None:
            return []
        out = []
        for i, item in enumerate(self.seq(value, line, key)):
            where, at = f"{key}[{i}]", value.lines[i]
            item = self.entry(item, at, where, Model, shorthand="pretrained")
            pretrained = self.string(item["pretrained"], at, where + ".pretrained")
            if "," in pretrained:
                raise self.error(at, where + ".pretrained", f"{pretrained!r}: a path with ',' cannot go through "
                                                            f"lm-eval's --model_args")
            name = self.string(item.get("name", os.path.basename(pretrained.rstrip("/"))), at, where + ".name")
            model_args = self.args(item.get("model_args"), at, where + ".model_args")
            batch = item.get("batch_size")
            batch = None if batch is None else self.integer(batch, at, where + ".batch_size")
            out.append(Model(name, pretrained, model_args, batch))
        self.unique(out, value.lines, key)
        return out

    def caches(self, value, line: int) -> list[CacheSpec]:
        if value is None:
            return [CacheSpec(NO_CACHE, NO_CACHE)]
        out = []
        for i, item in enumerate(self.seq(value, line, "caches")):
            where, at = f"caches[{i}]", value.lines[i]
            item = self.entry(item, at, where, CacheSpec, shorthand="cache")
            cache = self.string(item["cache"], at, where + ".cache")
            params = self.args(item.get("params"), at, where + ".params")
            try:
                _check_cache(cache, params)
            except (ValueError, TypeError) as e:
                raise self.error(at, where, str(e)) from None
            name = self.string(item.get("name", _default_name(cache, params)), at, where + ".name")
            out.append(CacheSpec(name, cache, params))
        self.unique(out, value.lines, "caches")
        return out

    def strategies(self, value, line: int, caches: list[CacheSpec]) -> list[Strategy]:
        if value is None:
            return [Strategy("vanilla", "vanilla", family="vanilla", line=line)]
        out, lines = [], []
        cache_names = [c.name for c in caches]
        for i, item in enumerate(self.seq(value, line, "strategies")):
            where, at = f"strategies[{i}]", value.lines[i]
            item = self.entry(item, at, where, Strategy, shorthand="strategy")
            strategy = self.string(item["strategy"], at, where + ".strategy")
            params = self.args(item.get("params"), at, where + ".params", sweep=True)
            only = item.get("caches")
            if only is not None:
                only = tuple(self.labels(c, at, where + ".caches", cache_names, "cache", "caches")
                             for c in self.seq(only, at, where + ".caches"))
            swept = [k for k, v in params.items() if isinstance(v, list)]
            name = item.get("name")
            name = None if name is None else self.string(name, at, where + ".name")
            family = item.get("family", name or _default_name(strategy, params))
            family = self.string(family, at, where + ".family")
            # A sweep: one strategy per combination of the listed values, in the order written.
            for combo in itertools.product(*(params[k] for k in swept)):
                one = {**params, **dict(zip(swept, combo))}
                try:
                    _check_strategy(strategy, one)
                except (ValueError, TypeError) as e:
                    raise self.error(at, where, str(e)) from None
                label = _default_name(strategy, one) if name is None else \
                    " ".join([name, *(f"{k}={v}" for k, v in zip(swept, combo))])
                out.append(Strategy(label, strategy, one, only, family, at, i))
                lines.append(at)
        self.unique(out, lines, "strategies")
        return out

    def check_pairs(self, strategies, caches, exclude) -> None:
        """Every strategy x cache pair that will run must be one ``--model dllm`` accepts."""
        pairs = [ex for ex in exclude if ex.model is None and ex.task is None]
        checked = set()
        for s in strategies:
            for c in caches:
                if (s.caches is not None and c.name not in s.caches) or (s.strategy, c.cache) in checked or \
                        any(ex.matches(ex.model, s, c.name, ex.task) for ex in pairs):
                    continue
                try:
                    _check_strategy(s.strategy, s.params, cache=c.cache)
                except ValueError as e:
                    raise self.error(s.line, f"strategies[{s.entry}]", f"{e} List the caches it runs "
                                                                       f"with under `caches:` in this entry, or add "
                                                                       f"{{strategy: {s.family}, cache: {c.name}}} "
                                                                       f"to `exclude:`") from None
                checked.add((s.strategy, c.cache))

    def baseline(self, value, line: int, strategies, caches) -> Baseline:
        names_s, names_c = [s.name for s in strategies], [c.name for c in caches]
        default_cache = NO_CACHE if NO_CACHE in names_c else names_c[0]
        if value is None:
            return Baseline(names_s[0], default_cache)
        value = self.entry(value, line, "baseline", Baseline)
        return Baseline(
            self.labels(value.get("strategy", names_s[0]), value.lines.get("strategy", line), "baseline.strategy",
                        names_s, "strategy", "strategies"),
            self.labels(value.get("cache", default_cache), value.lines.get("cache", line), "baseline.cache",
                        names_c, "cache", "caches"))

    def exclude(self, value, line: int, models, strategies, caches, tasks) -> list[Exclude]:
        if value is None:
            return []
        known = {"model": [m.name for m in models],
                 "strategy": list(dict.fromkeys([s.name for s in strategies] + [s.family for s in strategies])),
                 "cache": [c.name for c in caches], "task": [t.name for t in tasks]}
        plural = {"model": "models", "strategy": "strategies", "cache": "caches", "task": "tasks"}
        out = []
        for i, item in enumerate(self.seq(value, line, "exclude")):
            where, at = f"exclude[{i}]", value.lines[i]
            item = self.entry(item, at, where, Exclude)
            if not item:
                raise self.error(at, where, "an empty entry would exclude every cell")
            for key, v in item.items():
                self.labels(v, item.lines[key], f"{where}.{key}", known[key], key, plural[key])
            out.append(Exclude(**item))
        return out


# ----------------------------------------------------------------------------------------------------------------
# The package's own checks. Every call from the matrix into the decoding code goes through these two functions.


def _check_strategy(strategy: str, params: dict, cache: Optional[str] = None) -> None:
    """What ``--model dllm`` checks at start-up (``lmeval_dllm.decoding.check_strategy``: the same function): the
    strategy exists and takes these parameters (names, types, ranges); with ``cache`` (a cache name, "none" for
    none), also that the pair can run. Lengths are checked per task, at run time."""
    from lmeval_dllm.decoding import check_strategy  # here: reading a matrix does not import torch

    check_strategy(strategy, params, cache)


def _check_cache(cache: str, params: dict) -> None:
    """What ``--model dllm`` checks of a cache at start-up (``lmeval_dllm.decoding.check_cache``): the name
    ("none" for none) and its parameters."""
    from lmeval_dllm.decoding import check_cache

    check_cache(cache, params)


def _default_name(kind: str, params: dict) -> str:
    return " ".join([kind, *(f"{k}={v}" for k, v in params.items())])


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", _Map: "a mapping", list: "a list", _Seq: "a list", str: f"the string {value!r}",
            bool: f"{value}"}.get(type(value), repr(value))
