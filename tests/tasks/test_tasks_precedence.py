"""Which decoding settings win: a task's generation_kwargs, the user's --gen_kwargs, or the user's --model_args.

The rule (lmeval_dllm/lm.py, docs/tasks.md): ``--model_args`` > task generation_kwargs with ``--gen_kwargs`` merged
in by lm-eval (``--gen_kwargs`` replaces the task's value of the same key) > defaults. Tasks carry no step count: one token
per step (the default) is every protocol's setting, so a user's ``gen_length`` never meets a stale ``steps``.
"""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from tasks_support import GSM8K_MINI, POEM_MINI, load_tasks


@pytest.fixture(scope="module")
def tasks() -> dict:
    return load_tasks(["gsm8k_fastdllm", "gsm8k_llada", "reversal_poem"], gsm8k_path=GSM8K_MINI, poem_path=POEM_MINI)


def gen_kwargs(tasks, name, **cli_gen_kwargs) -> dict:
    """The request's gen kwargs: the task's, with --gen_kwargs merged the way lm-eval merges them."""
    return {**tasks[name].config.generation_kwargs, **cli_gen_kwargs}


def resolved(lm, kwargs) -> tuple:
    config, sampler, _ = lm._decoding_for(kwargs)
    p = sampler.proposal
    return (config.gen_length, config.block_length, sampler.steps, sampler.num_transfer_tokens,
            p.logits_eos_inf, p.confidence_eos_eot_inf)


def dllm(llada_dir, **model_args):
    from lmeval_dllm.lm import DLLM

    return DLLM(pretrained=llada_dir, **model_args)


@pytest.mark.parametrize("model_args, cli, expected", [
    # (gen_length, block_length, steps, num_transfer_tokens, logits_eos_inf, confidence_eos_eot_inf)
    ({}, {}, (256, 32, None, None, False, False)),                                 # the task's protocol, 1 / step
    ({}, {"gen_length": 64, "steps": 32}, (64, 32, 32, None, False, False)),       # --gen_kwargs over the task
    ({}, {"gen_length": 64}, (64, 32, None, None, False, False)),
    ({"gen_length": 512}, {}, (512, 32, None, None, False, False)),                # --model_args over the task
    ({"steps": 64}, {}, (256, 32, 64, None, False, False)),
    ({"num_transfer_tokens": 2}, {}, (256, 32, None, 2, False, False)),
    ({"gen_length": 128, "block_length": 64}, {"gen_length": 64, "block_length": 16, "steps": 64},
     (128, 64, 64, None, False, False)),                                           # --model_args over --gen_kwargs
    ({"block_length": 8}, {"gen_length": 64, "steps": 64}, (64, 8, 64, None, False, False)),
])
def test_fastdllm_settings(tasks, llada_dir, model_args, cli, expected):
    assert resolved(dllm(llada_dir, **model_args), gen_kwargs(tasks, "gsm8k_fastdllm", **cli)) == expected


def test_eos_options_travel_with_the_task_and_yield_to_model_args(tasks, llada_dir):
    lm = dllm(llada_dir)
    assert resolved(lm, gen_kwargs(tasks, "gsm8k_llada")) == (512, 512, None, None, False, True)
    assert resolved(lm, gen_kwargs(tasks, "reversal_poem_forward")) == (28, 28, None, None, True, False)
    off = dllm(llada_dir, logits_eos_inf=False, confidence_eos_eot_inf=False)
    assert resolved(off, gen_kwargs(tasks, "gsm8k_llada"))[4:] == (False, False)
    assert resolved(off, gen_kwargs(tasks, "reversal_poem_forward"))[4:] == (False, False)


def test_a_step_budget_must_fit_the_gen_length(tasks, llada_dir):
    """A user's steps larger than the gen_length in force is refused, loudly, naming both."""
    with pytest.raises(ValueError, match="steps=256 must be at most gen_length=64"):
        resolved(dllm(llada_dir, steps=256), gen_kwargs(tasks, "gsm8k_fastdllm", gen_length=64))


def test_generation_records_the_gen_length_used(tasks, llada_dir):
    """Through generate_until with the task's own requests: RequestStats.gen_length per request."""
    task = tasks["reversal_poem_forward"]
    task.build_all_requests(limit=2)
    requests = [Instance("generate_until", inst.doc, inst.args, inst.idx) for inst in task.instances]
    for model_args, expected in (({}, 28), ({"gen_length": 14, "block_length": 7}, 14)):
        lm = dllm(llada_dir, **model_args)
        outputs = lm.generate_until(requests, disable_tqdm=True)
        assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
        assert [r.gen_length for r in lm.stats.requests] == [expected, expected]
        # logits_eos_inf and no stop string: one token per step over the whole length, never an early stop
        assert [(r.nfe, r.answer_tokens) for r in lm.stats.requests] == [(expected, expected)] * 2
        # a batch of both gives each request exactly its batch-size-1 answer
        assert dllm(llada_dir, batch_size=2, **model_args).generate_until(requests, disable_tqdm=True) == outputs
