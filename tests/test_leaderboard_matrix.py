"""The matrix parser (lmeval_dllm/leaderboard/matrix.py): cells it expands to, and errors naming file and line."""

from __future__ import annotations

import os

import pytest

from lmeval_dllm.leaderboard import DEFAULT_MATRIX
from lmeval_dllm.leaderboard.matrix import MatrixError, load_matrix, parse_matrix

GOOD = """\
name: mini
tasks: [tiny_gsm]
models:
  - {name: tiny, pretrained: tiny-llada, model_args: {gen_length: 32}}
strategies:
  - vanilla
  - {name: fast, strategy: vanilla, params: {threshold: 0.9}}
caches: [none, dual]
exclude:
  - {strategy: vanilla, cache: dual}
ar_baselines:
  - {name: gpt2, pretrained: /models/gpt2, batch_size: 4}
limit: 5
"""


def test_cells_of_a_matrix():
    m = parse_matrix(GOOD, "m.yaml")
    labels = [c.label for c in m.cells()]
    assert labels == ["tiny_gsm | tiny | vanilla | none", "tiny_gsm | tiny | fast | none",
                      "tiny_gsm | tiny | fast | dual", "tiny_gsm | gpt2 | AR"]
    cells = m.cells()
    assert [c.path for c in cells] == [os.path.join("tiny_gsm", "tiny", "vanilla--none"),
                                       os.path.join("tiny_gsm", "tiny", "fast--none"),
                                       os.path.join("tiny_gsm", "tiny", "fast--dual"),
                                       os.path.join("tiny_gsm", "gpt2", "ar")]
    # strategy, then cache, then its parameters, then the model's own arguments; no cache key for "none"
    assert cells[0].model_args() == {"pretrained": "tiny-llada", "strategy": "vanilla", "gen_length": 32}
    assert cells[2].model_args() == {"pretrained": "tiny-llada", "strategy": "vanilla", "cache": "dual",
                                     "threshold": 0.9, "gen_length": 32}
    assert cells[3].model_args() == {"pretrained": "/models/gpt2"} and cells[3].model.batch_size == 4
    assert m.baseline == ("vanilla", "none")  # default: first strategy, no cache
    assert (m.limit, m.batch_size, m.num_processes) == (5, 1, 1)


def test_default_names_and_directories():
    m = parse_matrix("tasks: [t]\nmodels: [org/My-Model]\nstrategies:\n"
                     "  - {strategy: vanilla, params: {threshold: 0.5, block_length: 8}}\n", "m.yaml")
    [cell] = m.cells()
    assert cell.label == "t | My-Model | vanilla threshold=0.5 block_length=8 | none"
    assert cell.path == os.path.join("t", "My-Model", "vanilla_threshold=0.5_block_length=8--none")


def test_the_bundled_matrices_parse():
    m = load_matrix(DEFAULT_MATRIX)
    assert len(m.cells()) == 12 and m.limit == 32
    assert sorted({c.strategy.family for c in m.cells()}) == ["eb-sampler", "fast-dllm", "vanilla"]
    assert m.include_path == (os.path.abspath(os.path.join(os.path.dirname(DEFAULT_MATRIX), "..", "..",
                                                           "task_configs")),)
    full = load_matrix(os.path.join(os.path.dirname(__file__), "..", "examples", "leaderboard_full.yaml"))
    assert len(full.cells()) == 76 and full.num_processes == 8
    assert [c.model.pretrained for c in full.cells() if c.kind == "ar"] == [
        "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"]
    wave = load_matrix(os.path.join(os.path.dirname(__file__), "..", "examples", "leaderboard_next_wave.yaml"))
    cells = [(c.strategy.name, c.cache.name, c.model_args()) for c in wave.cells()][:11]
    assert len(wave.cells()) == 22 and [label for label, _, _ in cells] == [
        "vanilla", *["threshold=0.9"] * 6, "credit", "hierarchy low_threshold=0.5", "hierarchy low_threshold=0.7",
        "prophet"]
    assert cells[3][2] == {"pretrained": "GSAI-ML/LLaDA-8B-Instruct", "strategy": "vanilla", "cache": "vicinity",
                           "threshold": 0.9, "prefix_look": 16, "after_look": 16, "warmup_steps": 4}
    assert [cache for _, cache, _ in cells[1:7]] == ["none", "dual", "vicinity", "elastic", "dkv", "sparse"]


@pytest.mark.parametrize("text, message", [
    # unknown keys: the line, the key, a suggestion and the allowed keys
    ("tasks: [t]\nmodels: [m]\ntaks: [x]\n",
     "m.yaml:3: unknown key 'taks'; did you mean 'tasks'? allowed: name, tasks, models, strategies, caches, "
     "ar_baselines, baseline, exclude, include_path, lm_eval_args, limit, batch_size, num_processes"),
    ("tasks: [t]\nmodels:\n  - pretrained: m\n    flavour: x\n",
     "m.yaml:4: models[0]: unknown key 'flavour'; allowed: name, pretrained, model_args, batch_size"),
    # strategies, caches and parameters are checked with the package's own registries
    ("tasks: [t]\nmodels: [m]\nstrategies:\n  - vanilla\n  - vanila\n",
     "m.yaml:5: strategies[1]: unknown strategy 'vanila'; did you mean 'vanilla'? available: vanilla, "
     "pc_sampler, eb_sampler, klass, ar, wino, daedal"),
    ("tasks: [t]\nmodels: [m]\nstrategies:\n  - {strategy: vanilla, params: {treshold: 0.9}}\n",
     "m.yaml:4: strategies[0]: unknown parameter 'treshold' for strategy 'vanilla'; did you mean 'threshold'?"),
    ("tasks: [t]\nmodels: [m]\nstrategies:\n  - {strategy: vanilla, params: {threshold: 1.5}}\n",
     "m.yaml:4: strategies[0]: threshold must be in [0, 1] (a probability), got 1.5"),
    ("tasks: [t]\nmodels: [m]\ncaches:\n  - none\n  - {cache: dllm, params: {kp: 0}}\n",
     "m.yaml:5: caches[1]: kp must be an integer >= 1, got 0"),
    ("tasks: [t]\nmodels: [m]\ncaches:\n  - {cache: prefix, params: {kp: 3}}\n",
     "m.yaml:4: caches[0]: unknown parameter 'kp' for cache 'prefix' accepted: refresh_interval"),
    ("tasks: [t]\nmodels: [m]\ncaches: [none, dul]\n",
     "m.yaml:3: caches[1]: unknown cache 'dul'; did you mean 'dual'? available: none, prefix, dual, dllm, d2cache"),
    # a strategy x cache pair that cannot work: the package's own check, and the two ways out
    ("tasks: [t]\nmodels: [m]\nstrategies:\n  - vanilla\n  - {strategy: wino}\ncaches: [none, dllm]\n",
     "m.yaml:5: strategies[1]: strategy 'wino' cannot be used with cache='dllm': the strategy runs rows that are "
     "not part of the canvas alongside it"),
    # structure
    ("tasks: [t]\nmodels: [m]\nlimit: -3\n", "m.yaml:3: limit: expected a number > 0"),
    ("tasks: t\nmodels: [m]\n", "m.yaml:1: tasks: expected a non-empty list, got the string 't'"),
    ("tasks: [t]\n", "m.yaml:1: nothing to run: give `models:` (dLLMs) and/or `ar_baselines:`"),
    ("tasks: [t]\nmodels:\n  - {pretrained: m, model_args: {stats_path: x}}\n",
     "m.yaml:3: models[0].model_args: 'stats_path' is set by the leaderboard itself"),
    ("tasks: [t]\nmodels: [a/m, b/m]\n",
     "m.yaml:2: models: 'm' has the same name as the entry on line 2; give each entry its own `name:`"),
    ("tasks: [t]\nmodels: [m]\nexclude:\n  - {strategy: fast}\n",
     "m.yaml:4: exclude[0].strategy: 'fast' is not a strategy name of this matrix; strategies: vanilla"),
    ("tasks: [t]\nmodels: [m]\nbaseline: {strategy: fats}\n",
     "m.yaml:3: baseline.strategy: 'fats' is not a strategy name of this matrix; strategies: vanilla"),
    ("tasks: [t]\nmodels: [m]\nlm_eval_args: [--limit, '3']\n",
     "m.yaml:3: lm_eval_args: --limit is set by the leaderboard"),
    ("tasks: [t]\nmodels: [m]\n  bad: indent\n", "m.yaml:3: not valid YAML"),
    ("tasks: [t]\ntasks: [u]\nmodels: [m]\n", "m.yaml:2: duplicate key 'tasks'"),
    ("", "m.yaml:1: empty matrix"),
])
def test_errors_name_the_line(text, message):
    with pytest.raises(MatrixError) as info:
        parse_matrix(text, "m.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_incompatible_pairs_narrowed_or_excluded():
    for way_out in ("  - {strategy: wino, caches: [none]}\ncaches: [none, dllm]\n",
                    "  - wino\ncaches: [none, dllm]\nexclude: [{strategy: wino, cache: dllm}]\n"):
        m = parse_matrix("tasks: [t]\nmodels: [m]\nstrategies:\n  - vanilla\n" + way_out, "m.yaml")
        assert [c.label for c in m.cells()] == ["t | m | vanilla | none", "t | m | vanilla | dllm", "t | m | wino | none"]


def test_missing_file_and_include_path(tmp_path):
    with pytest.raises(MatrixError, match="cannot read the matrix file"):
        load_matrix(str(tmp_path / "nope.yaml"))
    path = tmp_path / "m.yaml"
    path.write_text("tasks: [t]\nmodels: [m]\ninclude_path: tasks\n")
    with pytest.raises(MatrixError, match=r"m.yaml:3: include_path: 'tasks' is not a directory \(relative paths "
                                          r"are relative to the matrix file"):
        load_matrix(str(path))
    (tmp_path / "tasks").mkdir()
    assert load_matrix(str(path)).include_path == (str(tmp_path / "tasks"),)


SWEEP = """\
tasks: [t]
models: [m]
strategies:
  - {name: vanilla, strategy: vanilla, caches: [none]}
  - {name: fast, strategy: vanilla, params: {threshold: [0.5, 0.9], block_length: 8}}
  - {strategy: eb_sampler, params: {gamma: [0.01, 1]}, caches: [none]}
caches: [none, dual]
exclude: [{strategy: fast threshold=0.5, cache: dual}]
"""


def test_a_list_of_values_is_a_sweep():
    m = parse_matrix(SWEEP, "m.yaml")
    cells = m.cells()
    assert [c.label for c in cells] == [
        "t | m | vanilla | none", "t | m | fast threshold=0.5 | none", "t | m | fast threshold=0.9 | none",
        "t | m | fast threshold=0.9 | dual", "t | m | eb_sampler gamma=0.01 | none",
        "t | m | eb_sampler gamma=1 | none"]
    # one value per cell, the other parameters shared; the entry's name is the family (one curve)
    assert cells[2].model_args() == {"pretrained": "m", "strategy": "vanilla", "threshold": 0.9, "block_length": 8}
    assert [c.strategy.family for c in cells] == ["vanilla", "fast", "fast", "fast", "eb_sampler gamma=[0.01, 1]",
                                                  "eb_sampler gamma=[0.01, 1]"]
    assert cells[3].path == os.path.join("t", "m", "fast_threshold=0.9--dual")
    # several lists: every combination, in the order written; `family:` names the curve
    m = parse_matrix("tasks: [t]\nmodels: [m]\nstrategies:\n  - {name: s, family: fast, strategy: vanilla, "
                     "params: {threshold: [0.5, 0.9], block_length: [8, 16]}}\n", "m.yaml")
    assert [(c.strategy.name, c.strategy.family) for c in m.cells()] == [
        ("s threshold=0.5 block_length=8", "fast"), ("s threshold=0.5 block_length=16", "fast"),
        ("s threshold=0.9 block_length=8", "fast"), ("s threshold=0.9 block_length=16", "fast")]
    # a family can be excluded as a whole
    m = parse_matrix(SWEEP.replace("strategy: fast threshold=0.5, cache: dual", "strategy: fast, cache: dual"),
                     "m.yaml")
    assert [c.label for c in m.cells() if c.cache.name == "dual"] == []


@pytest.mark.parametrize("params, message", [
    # every value passes the check a single value does, and the error says which
    ("{threshold: [0.5, 1.5]}", "m.yaml:4: strategies[0]: threshold must be in [0, 1] (a probability), got 1.5"),
    ("{treshold: [0.5]}", "m.yaml:4: strategies[0]: unknown parameter 'treshold' for strategy 'vanilla'; did you "
                          "mean 'threshold'?"),
    ("{threshold: []}", "m.yaml:4: strategies[0].params: threshold: an empty list sweeps nothing; give at least one "
                        "value"),
    ("{threshold: [0.5, 0.5]}", "m.yaml:4: strategies[0].params: threshold: a value is listed twice in [0.5, 0.5]"),
    ("{threshold: [[0.5]]}", "m.yaml:4: strategies[0].params: threshold: expected a single value or a list of "
                             "values, got a list"),
])
def test_sweep_errors(params, message):
    with pytest.raises(MatrixError) as info:
        parse_matrix(f"tasks: [t]\nmodels: [m]\nstrategies:\n  - {{strategy: vanilla, params: {params}}}\n", "m.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_only_strategy_parameters_sweep():
    with pytest.raises(MatrixError) as info:
        parse_matrix("tasks: [t]\nmodels: [m]\ncaches:\n  - {cache: prefix, params: {refresh_interval: [2, 4]}}\n",
                     "m.yaml")
    assert str(info.value) == "m.yaml:4: caches[0].params: refresh_interval: expected a single value, got a list"


def test_allowed_keys_are_the_dataclass_fields():
    from dataclasses import fields

    from lmeval_dllm.leaderboard.matrix import Matrix, Strategy, _keys

    assert _keys(Matrix) == tuple(f.name for f in fields(Matrix))[1:]  # all but `path`
    assert _keys(Strategy) == ("name", "strategy", "params", "caches", "family")
    with pytest.raises(MatrixError) as info:
        parse_matrix("tasks: [t]\nmodels: [m]\nstrategies:\n  - {strategy: vanilla, famly: x}\n", "m.yaml")
    assert str(info.value) == ("m.yaml:4: strategies[0]: unknown key 'famly'; did you mean 'family'? allowed: name, "
                               "strategy, params, caches, family")
