"""Turning ``key=value`` arguments into typed keyword arguments, loudly.

lm-eval hands us ``--model_args`` already split (numbers and booleans converted) and task ``generation_kwargs``
as YAML values. Every plug-in (sampler, cache) declares its parameters as typed keyword-only arguments of its
``__init__``; :func:`coerce_kwargs` checks names against that signature and converts values to the declared type,
so a typo or a wrong type fails before any model work with the parameter, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any, Iterable, Optional, Union

_UNIONS = (Union, types.UnionType)  # Optional[int] and int | None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def keyword_params(fn) -> dict[str, tuple[Any, Any]]:
    """{name: (type annotation, default)} of the keyword-only parameters of ``fn``."""
    hints = typing.get_type_hints(fn)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            out[p.name] = (hints.get(p.name, Any), p.default)
    return out


def _describe(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in _UNIONS:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or None" if type(None) in args else "")
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(name: str, value: Any, tp) -> Any:
    """Convert ``value`` to ``tp`` (bool, int, float, str, Optional of those) or raise ValueError."""
    if typing.get_origin(tp) in _UNIONS:
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, a)
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{name}={value!r}: expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ValueError(f"{name}={value!r}: expected {_describe(tp)}")


def coerce_kwargs(fn, kwargs: dict[str, Any], what: str,
                  params: Optional[dict[str, tuple[Any, Any]]] = None) -> dict[str, Any]:
    """Check ``kwargs`` against ``fn``'s keyword-only parameters (or the given subset ``params`` of them) and
    convert their values."""
    params = keyword_params(fn) if params is None else params
    out = {}
    for name, value in kwargs.items():
        if name not in params:
            raise ValueError(
                f"unknown parameter {name!r} for {what}{did_you_mean(name, params)} "
                f"accepted: {', '.join(sorted(params)) or '(none)'}"
            )
        out[name] = coerce(name, value, params[name][0])
    return out
