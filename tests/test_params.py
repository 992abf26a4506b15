"""key=value arguments to typed keyword arguments (lmeval_dllm/params.py)."""

from __future__ import annotations

from typing import Optional

import pytest

from lmeval_dllm.params import coerce, coerce_kwargs


@pytest.mark.parametrize("value,tp,expected", [
    ("true", bool, True), ("False", bool, False), (1, bool, True),
    ("12", int, 12), (3.0, int, 3), ("0.5", float, 0.5), (2, float, 2.0),
    ("none", Optional[int], None), (None, Optional[float], None), ("0.5", float | None, 0.5), ("null", int | None, None),
    ("abc", str, "abc"),
])
def test_coerce(value, tp, expected):
    got = coerce("x", value, tp)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value,tp,msg", [
    ("maybe", bool, "x='maybe': expected a boolean \\(true/false\\)"),
    (2.5, int, "x=2.5: expected an integer"),
    (True, int, "x=True: expected an integer"),
    ("a", int | None, "x='a': expected an integer or None"),
    ("fast", Optional[float], "x='fast': expected a number or None"),
])
def test_coerce_errors(value, tp, msg):
    with pytest.raises(ValueError, match=msg):
        coerce("x", value, tp)


def test_coerce_kwargs_names_and_suggests():
    def f(*, threshold: Optional[float] = None, steps: Optional[int] = None):
        pass

    assert coerce_kwargs(f, {"threshold": "0.9", "steps": 8}, "strategy 'x'") == {"threshold": 0.9, "steps": 8}
    with pytest.raises(ValueError, match="unknown parameter 'treshold' for strategy 'x'; did you mean 'threshold'\\? "
                                         "accepted: steps, threshold"):
        coerce_kwargs(f, {"treshold": 0.9}, "strategy 'x'")
