"""lmeval_dllm/decoding.py: one pure function decides what a request group decodes with. No model is loaded here."""

from __future__ import annotations

import pytest

from lmeval_dllm.decoding import (
    DEFAULT_BLOCK_LENGTH, Decoding, all_decoding_keys, check_cache, check_strategy, resolve, split_gen_kwargs,
)
from lmeval_dllm.generate import GenerationConfig

TASK = {"until": ["Q:"], "max_gen_toks": 64}


def lengths(d: Decoding):
    return (d.config.gen_length, d.config.block_length) if d.config is not None else None


# --- precedence: --model_args > task generation kwargs > defaults ------------------------------------------------


@pytest.mark.parametrize("user, task, expected", [
    ({}, TASK, (64, 32)),                                                  # max_gen_toks is the default gen_length
    ({}, {**TASK, "gen_length": 128}, (128, 32)),                          # the task's gen_length beats its budget
    ({"gen_length": 96}, {**TASK, "gen_length": 128}, (96, 32)),           # --model_args beat the task
    ({"block_length": 8}, {**TASK, "block_length": 16}, (64, 8)),
    ({}, {**TASK, "block_length": 16}, (64, 16)),
    ({}, {"until": []}, (256, 32)),                                        # no budget: lm-eval's default, 256
])
def test_precedence(user, task, expected):
    assert lengths(resolve("vanilla", None, user, task)) == expected


def test_outputs_of_one_resolution():
    d = resolve("vanilla", "d2cache", {"threshold": 0.9, "sigma": 5.0, "current_k": 4},
                {"until": "Q:", "max_new_tokens": 32, "do_sample": False, "temperature": 0.7}, max_length=512)
    assert d.config == GenerationConfig(32, 32) and d.sampler.threshold == 0.9
    assert d.cache == "d2cache" and d.cache_params == {"sigma": 5.0, "current_k": 4}  # sigma goes to both
    assert d.params == {"threshold": 0.9, "sigma": 5.0, "temperature": 0.0}  # do_sample=False: greedy
    assert d.sampler.sigma == 5.0 and d.until == ("Q:",) and d.max_gen_toks == 32 and d.notes == ()


def test_cache_only_name_goes_to_the_cache_alone():
    d = resolve("vanilla", "dllm", {"kp": 10}, None)
    assert d.cache_params == {"kp": 10} and d.params == {} and d.config is None
    assert resolve("vanilla", "none", {}).cache is None


def test_user_params_are_checked_without_a_task():
    d = resolve("vanilla", None, {"gen_length": "64", "block_length": 16})
    assert lengths(d) == (64, 16) and d.params == {"gen_length": 64, "block_length": 16}  # converted


# --- names and values: errors before any work --------------------------------------------------------------------


@pytest.mark.parametrize("strategy, cache, user, task, msg", [
    ("vanila", None, {}, None, "unknown strategy 'vanila'; did you mean 'vanilla'\\? available: vanilla"),
    ("vanilla", "duel", {}, None, "unknown cache 'duel'; did you mean 'dual'\\?"),
    ("wino", "dllm", {}, None, "strategy 'wino' cannot be used with cache='dllm'"),
    ("daedal", "d2cache", {}, None, "strategy 'daedal' cannot be used with cache='d2cache'"),
    ("vanilla", None, {"threshhold": 0.9}, None,
     "unknown parameter 'threshhold' in --model_args for strategy 'vanilla'; did you mean 'threshold'\\?"),
    ("vanilla", None, {}, {"kp": 3},
     "unknown parameter 'kp' in the task's generation_kwargs / --gen_kwargs for strategy 'vanilla' \\(cache "
     "parameters go in --model_args, with the cache they belong to\\)"),
    ("vanilla", "dllm", {}, {"kp": 3}, "unknown parameter 'kp' in the task's generation_kwargs"),
    ("vanilla", "prefix", {"kp": 3}, None, "unknown parameter 'kp' in --model_args for strategy 'vanilla' \\('kp' "
                                           "is a parameter of cache dllm, not of cache='prefix'\\)"),
    ("vanilla", None, {"threshold": "high"}, None, "threshold='high': expected a number or None"),
    ("daedal", None, {"gen_length": 64}, None, "strategy 'daedal' chooses each answer's length itself"),
    ("vanilla", None, {}, {"max_gen_toks": 0}, "max_gen_toks=0 in the task's generation_kwargs / --gen_kwargs: the "
                                               "generation budget must be an integer >= 1"),
])
def test_named_errors(strategy, cache, user, task, msg):
    with pytest.raises(ValueError, match=msg):
        resolve(strategy, cache, user, task)


# --- robustness: 0 is a value; block_length decisions --------------------------------------------------------------


@pytest.mark.parametrize("user, task, msg", [
    ({}, {**TASK, "gen_length": 0}, "gen_length must be an integer >= 1, got 0"),  # was: `or` -> max_gen_toks
    ({}, {**TASK, "block_length": 0}, "block_length must be an integer >= 1, got 0"),  # was: `or` -> 32
    ({"block_length": 0}, None, "block_length must be an integer >= 1, got 0"),
    ({"gen_length": 0}, None, "gen_length must be an integer >= 1, got 0"),
])
def test_zero_is_not_missing(user, task, msg):
    with pytest.raises(ValueError, match=msg):
        resolve("vanilla", None, user, task)


def test_block_length_not_given_and_not_dividing_is_one_block_with_a_note():
    d = resolve("vanilla", None, {}, {**TASK, "max_gen_toks": 24})
    assert lengths(d) == (24, 24)
    assert d.notes == (f"gen_length=24 is not a multiple of the default block_length={DEFAULT_BLOCK_LENGTH} and no "
                       "block_length was given: one block of 24",)
    assert resolve("vanilla", None, {}, TASK).notes == ()


@pytest.mark.parametrize("user, task", [({"block_length": 32}, {**TASK, "max_gen_toks": 24}),
                                        ({}, {**TASK, "max_gen_toks": 24, "block_length": 32}),
                                        ({"gen_length": 100, "block_length": 32}, None)])
def test_a_given_block_length_that_does_not_divide_is_an_error(user, task):
    with pytest.raises(ValueError, match="gen_length=(24|100) is not divisible by block_length=32"):
        resolve("vanilla", None, user, task)


# --- the model's context ---------------------------------------------------------------------------------------------


def test_given_lengths_must_leave_room_for_a_prompt():
    with pytest.raises(ValueError, match="^gen_length=512 from --model_args leaves no room for a prompt in "
                                         "max_length=512; pass gen_length=<at most 511>"):
        resolve("vanilla", None, {"gen_length": 512}, TASK, max_length=512)
    with pytest.raises(ValueError, match="^gen_length=512 from the task's generation_kwargs"):
        resolve("vanilla", None, {}, {**TASK, "gen_length": 512}, max_length=512)
    with pytest.raises(ValueError, match="^max_gen_toks=600 \\(the generation budget, used as gen_length\\) from "
                                         "the task's generation_kwargs / --gen_kwargs leaves no room for a prompt in "
                                         "max_length=512"):
        resolve("vanilla", None, {}, {**TASK, "max_gen_toks": 600}, max_length=512)
    assert lengths(resolve("vanilla", None, {}, {**TASK, "max_gen_toks": 480}, max_length=512)) == (480, 32)
    with pytest.raises(ValueError, match="^max_gen_length=2048 from --model_args leaves no room for a prompt in "
                                         "max_length=512; pass max_gen_length=<at most 511> \\(e.g. 256\\)"):
        resolve("daedal", None, {"max_gen_length": 2048}, max_length=512)
    with pytest.raises(ValueError, match="^initial_gen_length=600 from the task's"):
        resolve("daedal", None, {}, {**TASK, "initial_gen_length": 600}, max_length=512)


def test_daedal_default_max_gen_length_fits_the_context():
    """min(2048, max_length // 2): LLaDA-8B's 4096 keeps the release's 2048, tiny-llada's 512 gets 256."""
    d = resolve("daedal", None, {}, TASK, max_length=512)
    assert (d.sampler.max_gen_length, d.sampler.initial_gen_length, d.config) == (256, 64, GenerationConfig(None, 32))
    assert d.notes == ("strategy 'daedal' chooses each answer's length: the task's gen_length=None / max_gen_toks=64 "
                       "are not used",
                       "strategy 'daedal': the default max_gen_length=2048 does not fit max_length=512: "
                       "max_gen_length=256 (half the context, leaving the rest for the prompt; pass max_gen_length "
                       "to choose)")
    assert resolve("daedal", None, {}, max_length=4096).sampler.max_gen_length == 2048
    assert resolve("daedal", None, {}, max_length=4096).notes == ()
    assert resolve("daedal", None, {}).sampler.max_gen_length == 2048  # no context known: the release default
    assert resolve("daedal", None, {"max_gen_length": 500}, max_length=512).sampler.max_gen_length == 500  # given
    assert resolve("daedal", None, {"initial_gen_length": 300}, max_length=512).sampler.max_gen_length == 300
    tiny = resolve("daedal", None, {}, max_length=100).sampler
    assert (tiny.max_gen_length, tiny.initial_gen_length) == (50, 50)


def test_default_budget_fits_a_small_context():
    d = resolve("vanilla", None, {}, {"until": []}, max_length=200)
    assert lengths(d) == (100, 100) and d.notes[0].startswith(
        "the task names no generation budget and the default max_gen_toks=256 leaves no room for a prompt in "
        "max_length=200: gen_length=100")


# --- what the leaderboard matrix and hf_ar use ---------------------------------------------------------------------


def test_check_strategy_and_check_cache():
    check_strategy("vanilla", {"threshold": 0.9, "gen_length": 64})
    with pytest.raises(ValueError, match="^unknown parameter 'treshold' for strategy 'vanilla'; did you mean "
                                         "'threshold'\\? accepted: .* \\(cache parameters go under the cache\\)$"):
        check_strategy("vanilla", {"treshold": 0.9})
    with pytest.raises(ValueError, match="threshold must be in \\[0, 1\\]"):
        check_strategy("vanilla", {"threshold": 1.5})
    check_cache("dllm", {"kp": 10})
    check_cache("none", {})
    with pytest.raises(ValueError, match="^unknown parameter 'kp' for cache 'prefix' accepted: refresh_interval"):
        check_cache("prefix", {"kp": 3})
    with pytest.raises(ValueError, match="kp must be an integer >= 1, got 0"):
        check_cache("dllm", {"kp": 0})


def test_all_decoding_keys():
    keys = all_decoding_keys()
    assert {"gen_length", "block_length", "threshold", "temperature", "max_gen_length", "kp", "rollout_p"} <= keys
    assert "until" not in keys and "max_gen_toks" not in keys


def test_split_gen_kwargs_is_reexported_by_lm():
    from lmeval_dllm import lm

    assert lm.split_gen_kwargs is split_gen_kwargs and lm.resolve is resolve
