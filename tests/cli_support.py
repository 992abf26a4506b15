"""Run several ``lm_eval`` command lines in one Python process (used by tests/test_strategies_cli.py).

    python tests/cli_support.py runs.json

``runs.json`` is a list of argument lists (what follows ``lm_eval`` on a command line). Each one goes through
``lm_eval.__main__.cli_evaluate``, the function behind the ``lm_eval`` executable, exactly as typed. What is
shared between runs is the interpreter (imports) and lm-eval's task index: building that index parses ~14k task
YAMLs (seconds of CPU per command line), so it is built once and reused. A run that fails records its error in
``<output_path>/error.txt`` and the next one still runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback


def main(path: str) -> None:
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.tasks import _index

    build = _index.TaskIndex.build
    cached = functools.lru_cache(maxsize=None)(lambda paths, **kw: build(list(paths), **kw))
    _index.TaskIndex.build = staticmethod(lambda paths, **kw: dict(cached(tuple(paths), **kw)))

    with open(path, encoding="utf-8") as f:
        runs = json.load(f)
    for argv in runs:
        out = argv[argv.index("--output_path") + 1]
        os.makedirs(out, exist_ok=True)
        sys.argv = ["lm_eval", *argv]
        try:
            cli_evaluate()
        except BaseException:  # noqa: BLE001 - recorded for the test that owns this run, then go on
            with open(os.path.join(out, "error.txt"), "w", encoding="utf-8") as f:
                f.write(traceback.format_exc())


if __name__ == "__main__":
    main(sys.argv[1])
