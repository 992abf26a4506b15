"""Every strategy x cache with its defaults on the bundled model (issue 18), through lm-eval's Python API.

``lm_eval.simple_evaluate(model="dllm", model_args="pretrained=tiny-llada,strategy=S,cache=C")`` on ``tiny_gsm``
(``--limit 2``, the chat template, batch size 2, the task's own lengths: gen_length 64, block_length 32). Per
combination, exactly: both requests answered; each answer equals what the same settings give a prompt decoded
alone (batch size 1, straight through ``DLLM.generate_until``), with the same NFE; the statistics lm-eval reports
are those of the requests. DAEDAL's default ``max_gen_length=2048`` does not fit tiny-llada's 512 positions: it
runs with the fitted default (256). A pair that cannot work, and pc_sampler's default (it needs a frequency table,
which no default can provide), are named errors before the checkpoint is touched.
"""

from __future__ import annotations

import os

import pytest
from lm_eval.api.instance import Instance

from lmeval_dllm.caches import CACHES, cache_class, check_compatible
from lmeval_dllm.lm import DLLM
from lmeval_dllm.samplers import SAMPLERS

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STRATEGIES = ["vanilla", "pc_sampler", "eb_sampler", "klass", "wino", "daedal", "ar", "hierarchy", "credit", "prophet",
              "d3llm", "llada21_edit"]
CACHE_NAMES = ["none", "prefix", "dual", "dllm", "d2cache", "vicinity", "block", "sparse", "elastic", "dkv"]
# Caches for block-causal models only (SDAR, TraDo, LLaDA2): refused on the bundled LLaDA (test below); their
# every-strategy runs are in tests/test_sdar.py.
BLOCK_CAUSAL_ONLY = ["block"]
NEEDS = {"pc_sampler": "debias=false"}  # its default needs a frequency table (test below); this is the closest
ONE_TOKEN_PER_STEP = {"vanilla", "pc_sampler", "ar"}  # their defaults commit exactly one token per step


def allowed(strategy, cache):
    try:
        check_compatible(SAMPLERS[strategy], cache_class(None if cache == "none" else cache))
        return True
    except ValueError:
        return False


PAIRS = [(s, c) for s in STRATEGIES for c in CACHE_NAMES if allowed(s, c) and c not in BLOCK_CAUSAL_ONLY]
REFUSED = [(s, c) for s in STRATEGIES for c in CACHE_NAMES if not allowed(s, c)]


def test_the_lists_are_the_registries():
    assert set(STRATEGIES) == set(SAMPLERS) and set(CACHE_NAMES) == {"none", *CACHES}
    assert BLOCK_CAUSAL_ONLY == [c for c in CACHE_NAMES if cache_class(None if c == "none" else c).needs_block_causal]
    assert REFUSED == [("wino", "dllm"), ("wino", "d2cache"), ("wino", "block"), ("wino", "sparse"),
                       ("wino", "elastic"), ("wino", "dkv"), ("daedal", "dllm"), ("daedal", "d2cache"),
                       ("daedal", "vicinity"), ("daedal", "block"), ("daedal", "sparse"), ("daedal", "elastic"),
                       ("daedal", "dkv"), ("llada21_edit", "elastic")]


@pytest.mark.parametrize("cache", BLOCK_CAUSAL_ONLY)
def test_a_block_causal_cache_is_refused_on_the_bundled_model_before_its_weights(cache, monkeypatch):
    import lmeval_dllm.models

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(lmeval_dllm.models, "load_model", no_weights)
    with pytest.raises(ValueError, match=rf"^cache={cache!r} serves block-causal \(block-diffusion\) models only"):
        DLLM(pretrained="tiny-llada", cache=cache)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=os.path.join(ROOT, "task_configs"))


@pytest.mark.parametrize("strategy, cache", PAIRS, ids=[f"{s}-{c}" for s, c in PAIRS])
def test_defaults_run_on_the_bundled_model(strategy, cache, task_manager):
    import lm_eval

    extra = f",{NEEDS[strategy]}" if strategy in NEEDS else ""
    results = lm_eval.simple_evaluate(
        model="dllm", model_args=f"pretrained=tiny-llada,strategy={strategy},cache={cache}{extra}",
        tasks=["tiny_gsm"], task_manager=task_manager, limit=2, apply_chat_template=True, log_samples=True,
        batch_size=2, verbosity="WARNING",
    )
    config = results["config"]
    samples = [s for s in results["samples"]["tiny_gsm"] if s["filter"] == "strict-match"]  # one per document
    assert (config["dllm_strategy"], config["dllm_cache"]) == (strategy, cache)
    assert len(samples) == 2
    stats = config["dllm_stats"]
    assert stats["requests"] == 2 and stats["batches"] == 1

    # The same requests, one at a time, straight through the model: the same answers and NFE.
    alone = DLLM(pretrained="tiny-llada", strategy=strategy, cache=cache, **dict(
        kv.split("=") for kv in extra[1:].split(",") if kv))
    answers = []
    for s in samples:
        context, gen_kwargs = s["arguments"][0]
        answers += alone.generate_until([Instance("generate_until", {}, (context, gen_kwargs), 0)],
                                        disable_tqdm=True)
    assert [s["resps"][0][0] for s in samples] == answers, (strategy, cache)
    rows = alone.stats.requests
    assert stats["mean_nfe"] == pytest.approx(sum(r.nfe for r in rows) / 2)
    assert stats["mean_answer_tokens"] == pytest.approx(sum(r.answer_tokens for r in rows) / 2)
    if strategy == "daedal":  # the fitted default: half of tiny-llada's 512 positions
        assert alone._decoding_for(gen_kwargs)[1].max_gen_length == 256
        assert all(64 <= r.gen_length <= 256 for r in rows)
    else:
        assert [r.gen_length for r in rows] == [64, 64]  # the task's gen_length
        assert all(1 <= r.nfe <= 64 for r in rows)
    if strategy in ONE_TOKEN_PER_STEP:
        assert [r.nfe for r in rows] == [r.committed_tokens for r in rows]


@pytest.mark.parametrize("cache", CACHE_NAMES)
def test_pc_sampler_default_needs_a_frequency_table_before_any_work(cache):
    with pytest.raises(ValueError, match="^pc_sampler with debias=true needs a token-frequency table: pass "
                                         "frequency_table=llada or frequency_table=dream"):
        DLLM(pretrained="/nonexistent/checkpoint", strategy="pc_sampler", cache=cache)


@pytest.mark.parametrize("strategy, cache", REFUSED, ids=[f"{s}-{c}" for s, c in REFUSED])
def test_refused_pairs_fail_before_any_work(strategy, cache, task_manager):
    import lm_eval

    with pytest.raises(ValueError, match=f"^strategy '{strategy}' cannot be used with cache='{cache}'"):
        lm_eval.simple_evaluate(model="dllm", model_args=f"pretrained=/nonexistent/checkpoint,strategy={strategy},"
                                                         f"cache={cache}", tasks=["tiny_gsm"],
                                task_manager=task_manager, limit=2)
