"""The leaderboard matrix: a YAML file naming models, strategies, caches, tasks and AR baselines, expanded into
cells (one ``lm_eval`` run each).

    tasks: [tiny_gsm]                       # or {task: gsm8k_fastdllm, metric: "exact_match,flexible-extract"}
    models:                                 # dLLMs, run with --model dllm
      - {name: tiny-llada, pretrained: tiny-llada}
    strategies:                             # decoding strategies with their parameters
      - vanilla
      - {name: fast-dllm-0.9, strategy: vanilla, params: {threshold: 0.9}}
    caches: [none, prefix, dual]            # or {name: dllm-cache, cache: dllm, params: {kp: 50, kr: 7}}
    ar_baselines:                           # AR models, run with --model hf_ar (lm-eval's hf) on the same tasks
      - {name: qwen2.5-7b, pretrained: Qwen/Qwen2.5-7B-Instruct, model_args: {dtype: bfloat16}}

Cells: every model x task x strategy x cache (a strategy's own ``caches:`` list narrows its caches; ``exclude``
drops combinations), then every AR baseline x task. Everything is checked here, before any run: keys, types,
strategy and cache names, their parameters (through the same constructors ``--model dllm`` uses) and every
strategy x cache pair. An error names the file, the line and the entry: ``full.yaml:14: strategies[1]: unknown
parameter 'treshold' for strategy 'vanilla'; did you mean 'threshold'? ...``.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

TOP_KEYS = ("name", "tasks", "models", "strategies", "caches", "ar_baselines", "baseline", "exclude",
            "include_path", "lm_eval_args", "limit", "batch_size", "num_processes")
TASK_KEYS = ("task", "metric")
MODEL_KEYS = ("name", "pretrained", "model_args", "batch_size")
STRATEGY_KEYS = ("name", "strategy", "params", "caches")
CACHE_KEYS = ("name", "cache", "params")
BASELINE_KEYS = ("strategy", "cache")
EXCLUDE_KEYS = ("model", "strategy", "cache", "task")
# --model_args names the runner sets itself
RESERVED_MODEL_ARGS = ("pretrained", "strategy", "cache", "stats_path", "batch_size")
NO_CACHE = "none"


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
# The parsed matrix


@dataclass(frozen=True)
class Task:
    name: str
    metric: Optional[str]  # "<metric>,<filter>" in lm-eval's results; None: the first one reported


@dataclass(frozen=True)
class Model:
    name: str  # label in the table and in directory names
    pretrained: str
    model_args: dict = field(default_factory=dict)
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class Strategy:
    name: str
    strategy: str
    params: dict = field(default_factory=dict)
    caches: Optional[tuple] = None  # cache labels this strategy runs with; None: all


@dataclass(frozen=True)
class CacheSpec:
    name: str
    cache: str  # "none" = exact computation
    params: dict = field(default_factory=dict)


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
    path: str
    name: str
    tasks: tuple
    models: tuple
    strategies: tuple
    caches: tuple
    ar_baselines: tuple
    baseline: tuple  # (strategy label, cache label): the speed-up reference of each model and task
    exclude: tuple  # of dicts {model|strategy|cache|task: label}
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
                        labels = {"model": model.name, "strategy": strategy.name, "cache": cache.name,
                                  "task": task.name}
                        if any(all(labels[k] == v for k, v in ex.items()) for ex in self.exclude):
                            continue
                        out.append(Cell("dllm", model, task, strategy, cache))
        for model in self.ar_baselines:
            for task in self.tasks:
                out.append(Cell("ar", model, task))
        return out


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

    def mapping(self, value, line: int, where: str, keys: tuple, required: tuple = ()) -> _Map:
        if not isinstance(value, dict):
            raise self.error(line, where, f"expected a mapping with keys {', '.join(keys)}, got "
                                          f"{_type_name(value)}")
        for key in value:
            if key not in keys:
                raise self.error(value.lines[key], where, f"unknown key {key!r}{_did_you_mean(key, keys)}"
                                                          f"allowed: {', '.join(keys)}")
        for key in required:
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

    def args(self, value, line: int, where: str, reserved: tuple) -> dict:
        """A ``key: value`` mapping that becomes part of ``--model_args`` (scalars, no commas)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(line, where, f"expected a mapping of parameter: value, got {_type_name(value)}")
        out = {}
        for key, v in value.items():
            at = value.lines[key]
            if key in reserved:
                raise self.error(at, where, f"{key!r} is set by the leaderboard itself; "
                                            f"set it elsewhere in the matrix (reserved: {', '.join(reserved)})")
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise self.error(at, where, f"parameter name {key!r} is not an identifier")
            if isinstance(v, (dict, list)) or v is None:
                raise self.error(at, where, f"{key}: expected a single value, got {_type_name(v)}")
            if "," in str(v) or "=" in str(v):
                raise self.error(at, where, f"{key}={v!r}: lm-eval's --model_args cannot carry ',' or '=' "
                                            f"in a value")
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

    # -- sections --------------------------------------------------------------------------------------------

    def matrix(self, doc) -> Matrix:
        if doc is None:
            raise MatrixError(f"{self.path}:1: empty matrix; it needs at least `tasks:` and `models:` or "
                              f"`ar_baselines:`")
        doc = self.mapping(doc, 1, "", TOP_KEYS, required=("tasks",))
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
        self.check_pairs(strategies, caches, doc.get("strategies"), doc.get("exclude"))
        baseline = self.baseline(doc.get("baseline"), where("baseline"), strategies, caches)
        exclude = self.exclude(doc.get("exclude"), where("exclude"), models, strategies, caches, tasks)

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
            if isinstance(item, str):
                item = {"task": item}
            else:
                item = self.mapping(item, at, where, TASK_KEYS, required=("task",))
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
            out.append(Task(name, metric))
        names = [t.name for t in out]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise self.error(value.lines[i], f"tasks[{i}]", f"task {n!r} is listed twice")
        return out

    def models(self, value, line: int, key: str) -> list[Model]:
        if value is None:
            return []
        out = []
        for i, item in enumerate(self.seq(value, line, key)):
            where, at = f"{key}[{i}]", value.lines[i]
            if isinstance(item, str):
                item = {"pretrained": item}
            else:
                item = self.mapping(item, at, where, MODEL_KEYS, required=("pretrained",))
            pretrained = self.string(item["pretrained"], at, where + ".pretrained")
            if "," in pretrained:
                raise self.error(at, where + ".pretrained", f"{pretrained!r}: a path with ',' cannot go through "
                                                            f"lm-eval's --model_args")
            name = self.string(item.get("name", os.path.basename(pretrained.rstrip("/"))), at, where + ".name")
            model_args = self.args(item.get("model_args"), at, where + ".model_args", RESERVED_MODEL_ARGS)
            batch = item.get("batch_size")
            batch = None if batch is None else self.integer(batch, at, where + ".batch_size")
            out.append(Model(name, pretrained, model_args, batch))
        self.unique(out, value.lines, key)
        return out

    def caches(self, value, line: int) -> list[CacheSpec]:
        from lmeval_dllm.caches import build_cache, cache_class

        if value is None:
            return [CacheSpec(NO_CACHE, NO_CACHE)]
        out = []
        for i, item in enumerate(self.seq(value, line, "caches")):
            where, at = f"caches[{i}]", value.lines[i]
            if isinstance(item, str):
                item = {"cache": item}
            else:
                item = self.mapping(item, at, where, CACHE_KEYS, required=("cache",))
            cache = self.string(item["cache"], at, where + ".cache")
            params = self.args(item.get("params"), at, where + ".params", RESERVED_MODEL_ARGS)
            try:
                cache_class(cache)
                build_cache(None if cache == NO_CACHE else cache, **params)
            except (ValueError, TypeError) as e:
                raise self.error(at, where, str(e)) from None
            name = self.string(item.get("name", _default_name(cache, params)), at, where + ".name")
            out.append(CacheSpec(name, cache, params))
        self.unique(out, value.lines, "caches")
        return out

    def strategies(self, value, line: int, caches: list[CacheSpec]) -> list[Strategy]:
        if value is None:
            return [Strategy("vanilla", "vanilla")]
        out = []
        cache_names = [c.name for c in caches]
        for i, item in enumerate(self.seq(value, line, "strategies")):
            where, at = f"strategies[{i}]", value.lines[i]
            if isinstance(item, str):
                item = {"strategy": item}
            else:
                item = self.mapping(item, at, where, STRATEGY_KEYS, required=("strategy",))
            strategy = self.string(item["strategy"], at, where + ".strategy")
            params = self.args(item.get("params"), at, where + ".params", RESERVED_MODEL_ARGS)
            try:
                _check_strategy(strategy, params)
            except (ValueError, TypeError) as e:
                raise self.error(at, where, str(e)) from None
            only = item.get("caches")
            if only is not None:
                only = self.seq(only, at, where + ".caches")
                for c in only:
                    if c not in cache_names:
                        raise self.error(at, where + ".caches", f"{c!r} is not a cache of this matrix"
                                                                f"{_did_you_mean(c, cache_names)}caches: "
                                                                f"{', '.join(cache_names)}")
                only = tuple(only)
            name = self.string(item.get("name", _default_name(strategy, params)), at, where + ".name")
            out.append(Strategy(name, strategy, params, only))
        self.unique(out, value.lines, "strategies")
        return out

    def check_pairs(self, strategies, caches, strategy_nodes, exclude_nodes) -> None:
        """Every strategy x cache pair that will run must be one ``--model dllm`` accepts."""
        from lmeval_dllm.caches import cache_class, check_compatible
        from lmeval_dllm.samplers import sampler_class

        excluded = {(e.get("strategy"), e.get("cache")) for e in (exclude_nodes or []) if isinstance(e, dict)
                    and set(e) <= {"strategy", "cache"}}
        for i, s in enumerate(strategies):
            for c in caches:
                if s.caches is not None and c.name not in s.caches:
                    continue
                if (s.name, c.name) in excluded or (s.name, None) in excluded or (None, c.name) in excluded:
                    continue
                try:
                    check_compatible(sampler_class(s.strategy), cache_class(c.cache))
                except ValueError as e:
                    at = strategy_nodes.lines[i] if strategy_nodes else 1
                    raise self.error(at, f"strategies[{i}]", f"{e} List the caches it runs "
                                                             f"with under `caches:` in this entry, or add "
                                                             f"{{strategy: {s.name}, cache: {c.name}}} to "
                                                             f"`exclude:`") from None

    def baseline(self, value, line: int, strategies, caches) -> tuple:
        names_s, names_c = [s.name for s in strategies], [c.name for c in caches]
        default_cache = NO_CACHE if NO_CACHE in names_c else names_c[0]
        if value is None:
            return names_s[0], default_cache
        value = self.mapping(value, line, "baseline", BASELINE_KEYS)
        s = value.get("strategy", names_s[0])
        c = value.get("cache", default_cache)
        if s not in names_s:
            raise self.error(value.lines.get("strategy", line), "baseline.strategy",
                             f"{s!r} is not a strategy name of this matrix{_did_you_mean(s, names_s)}"
                             f"strategies: {', '.join(names_s)}")
        if c not in names_c:
            raise self.error(value.lines.get("cache", line), "baseline.cache",
                             f"{c!r} is not a cache name of this matrix{_did_you_mean(c, names_c)}"
                             f"caches: {', '.join(names_c)}")
        return s, c

    def exclude(self, value, line: int, models, strategies, caches, tasks) -> list[dict]:
        if value is None:
            return []
        known = {"model": [m.name for m in models], "strategy": [s.name for s in strategies],
                 "cache": [c.name for c in caches], "task": [t.name for t in tasks]}
        plural = {"model": "models", "strategy": "strategies", "cache": "caches", "task": "tasks"}
        out = []
        for i, item in enumerate(self.seq(value, line, "exclude")):
            where, at = f"exclude[{i}]", value.lines[i]
            item = self.mapping(item, at, where, EXCLUDE_KEYS)
            if not item:
                raise self.error(at, where, "an empty entry would exclude every cell")
            for key, v in item.items():
                if v not in known[key]:
                    raise self.error(item.lines[key], f"{where}.{key}", f"{v!r} is not a {key} name of this "
                                                                        f"matrix{_did_you_mean(v, known[key])}"
                                                                        f"{plural[key]}: {', '.join(known[key])}")
            out.append(dict(item))
        return out


def _check_strategy(strategy: str, params: dict) -> None:
    """What ``--model dllm`` checks at start-up: the strategy exists and takes these parameters (names, types,
    ranges), through the same constructors. Lengths are checked per task, at run time."""
    from lmeval_dllm.lm import LOOP_PARAMS, PROPOSAL_PARAMS
    from lmeval_dllm.params import coerce, did_you_mean
    from lmeval_dllm.samplers import Proposal, build_sampler, sampler_params

    accepted = {**LOOP_PARAMS, **PROPOSAL_PARAMS, **sampler_params(strategy)}
    for name, value in params.items():
        if name not in accepted:
            raise ValueError(f"unknown parameter {name!r} for strategy {strategy!r}{did_you_mean(name, accepted)} "
                             f"accepted: {', '.join(sorted(accepted))} (cache parameters go under the cache)")
        params = {**params, name: coerce(name, value, accepted[name][0])}
    proposal = Proposal.from_params(**{k: v for k, v in params.items() if k in PROPOSAL_PARAMS})
    build_sampler(strategy, proposal, **{k: v for k, v in params.items() if k in sampler_params(strategy)})


def _default_name(kind: str, params: dict) -> str:
    return " ".join([kind, *(f"{k}={v}" for k, v in params.items())])


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", _Map: "a mapping", list: "a list", _Seq: "a list", str: f"the string {value!r}",
            bool: f"{value}"}.get(type(value), repr(value))
