"""The lm-eval glue under stress (lmeval_dllm/lm.py): likelihood requests, out-of-memory splitting, bad input,
determinism, and resuming a crashed run from lm-eval's --use_cache database."""

from __future__ import annotations

import math
import re
import sqlite3

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import local_tasks
from lmeval_dllm import lm as lm_module
from lmeval_dllm import likelihood as likelihood_module
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.likelihood import MonteCarloLikelihood, estimate
from lmeval_dllm.lm import DLLM, split_on_oom
from lmeval_dllm.samplers import Proposal, build_sampler

NOWHERE = "/nonexistent/checkpoint"
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def ll_req(context, continuation):
    return Instance("loglikelihood", {}, (context, continuation), 0)


def gen_req(context, max_gen_toks=8):
    return Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": max_gen_toks}), 0)


# --- loglikelihood / loglikelihood_rolling ------------------------------------------------------------------------


def test_loglikelihood_is_the_estimator_on_lm_evals_encoding(llada_dir):
    """One (estimate, is_greedy) per request, in order; the value depends only on the request and the seed, not
    on request order or batch size; an empty context is conditioned on BOS."""
    lm = DLLM(pretrained=llada_dir, mc_num=8, mc_batch_size=4)
    reqs = [ll_req("The sky is", " blue"), ll_req("", "Hello"), ll_req("2+2=", "4"), ll_req("Q:\tx\x00 ", "é😀")]
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    est = MonteCarloLikelihood(scheme="llada", mc_num=8, mc_batch_size=4)
    tok = lm.tokenizer
    expected_pairs = [(tok.encode("The sky is"), tok.encode(" blue")), ([tok.bos_token_id], tok.encode("Hello")),
                      (tok.encode("2+2="), tok.encode("4")), (tok.encode("Q:\tx\x00"), tok.encode(" é😀"))]
    assert out == [(estimate(lm.model, c, r, est, seed=1234), False) for c, r in expected_pairs]
    other = DLLM(pretrained=llada_dir, mc_num=8, mc_batch_size=4, batch_size=3)
    assert other.loglikelihood(reqs[::-1], disable_tqdm=True) == out[::-1]
    assert DLLM(pretrained=llada_dir, mc_num=8, mc_batch_size=4, seed=7).loglikelihood(reqs[:1])[0] != out[0]
    assert lm.get_model_info()["dllm_stats"]["likelihood"] == {
        "requests": 4, "rows": 32, "forward_passes": 8, "total_time_s": pytest.approx(
            lm.stats.likelihood_time_s)}


def test_dream_likelihood_appends_the_eos_anchor(dream_dir):
    lm = DLLM(pretrained=dream_dir, mc_num=8, mc_batch_size=8)
    [(value, greedy)] = lm.loglikelihood([ll_req("The sky is", " blue")], disable_tqdm=True)
    est = MonteCarloLikelihood(scheme="dream", mc_num=8, mc_batch_size=8)
    tok = lm.tokenizer
    assert value == estimate(lm.model, tok.encode("The sky is"), tok.encode(" blue"), est, seed=1234,
                             anchor_ids=[tok.eos_token_id])
    assert greedy is False


def test_is_check_greedy(llada_dir):
    """Off by default (always False, no extra passes); on: True exactly when one-token-per-step greedy decoding
    reproduces the continuation, at one forward pass per continuation token."""
    context = [72, 105, 58, 32]  # "Hi: "
    sampler = build_sampler("vanilla", Proposal.from_params(), num_transfer_tokens=1)
    lm = DLLM(pretrained=llada_dir, mc_num=4, mc_batch_size=4, is_check_greedy=True)
    greedy = generate(lm.model, torch.tensor([context]), None, sampler, GenerationConfig(3, 3),
                      stop_token_ids=torch.tensor([], dtype=torch.long)).tokens[0].tolist()
    wrong = greedy[:2] + [(greedy[2] + 1) % 256]
    reqs = [(("a", "b"), context, greedy), (("a", "c"), context, wrong)]
    assert [g for _, g in lm._loglikelihood_tokens(reqs, disable_tqdm=True)] == [True, False]
    assert lm.stats.likelihood_forward_passes == 2 * 1 + 2 * 3  # one MC group each + 3 greedy passes each
    off = DLLM(pretrained=llada_dir, mc_num=4, mc_batch_size=4)
    assert [g for _, g in off._loglikelihood_tokens(reqs, disable_tqdm=True)] == [False, False]
    assert off.stats.likelihood_forward_passes == 2


def test_loglikelihood_rolling_sums_lm_evals_windows(llada_dir):
    """A document longer than max_length is scored in lm-eval's disjoint rolling windows, each at most
    max_length tokens with its context, the first conditioned on BOS; every token is scored exactly once."""
    lm = DLLM(pretrained=llada_dir, mc_num=4, mc_batch_size=4, max_length=8)
    text = "A document of thirty bytes..."
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    tokens = list(text.encode())
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.tokenizer.bos_token_id, 7, 1)]
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(ctx) + len(cont) <= 8 for ctx, cont in windows) and windows[0][0] == [lm.tokenizer.bos_token_id]
    est = MonteCarloLikelihood(scheme="llada", mc_num=4, mc_batch_size=4)
    assert total == pytest.approx(sum(estimate(lm.model, c, r, est, seed=1234) for c, r in windows), abs=1e-9)
    assert lm.stats.likelihood_requests == len(windows) == 5


def test_likelihood_lengths(llada_dir):
    lm = DLLM(pretrained=llada_dir, mc_num=4, mc_batch_size=4, max_length=10)
    with pytest.raises(ValueError, match="context of 12 tokens \\+ continuation of 3 tokens exceeds max_length=10; "
                                         "raise max_length or pass truncation=True to keep the context's last 7"):
        lm.loglikelihood([ll_req("x" * 12, "abc")])
    with pytest.raises(ValueError, match="continuation of 10 tokens does not fit in max_length=10 with at least one "
                                         "context token"):
        lm.loglikelihood([ll_req("x", "y" * 10)])
    assert lm._loglikelihood_tokens([(("a", ""), [97], [])], disable_tqdm=True) == [(0.0, True)]  # nothing to score
    cut = DLLM(pretrained=llada_dir, mc_num=4, mc_batch_size=4, max_length=10, truncation=True)
    [(value, _)] = cut.loglikelihood([ll_req("0123456789AB", "abc")], disable_tqdm=True)
    est = MonteCarloLikelihood(scheme="llada", mc_num=4, mc_batch_size=4)
    assert value == estimate(cut.model, list(b"56789AB"), list(b"abc"), est, seed=1234)


# --- out of memory -------------------------------------------------------------------------------------------------


def test_split_on_oom_keeps_one_result_per_item_in_order():
    calls = []

    def run(lo, hi):
        calls.append((lo, hi))
        if hi - lo > 2:
            raise torch.cuda.OutOfMemoryError(OOM + "\nmore details")
        return list(range(lo, hi))

    assert split_on_oom(run, 0, 7, join=lambda p: p[0] + p[1], describe=str) == list(range(7))
    assert calls == [(0, 7), (0, 3), (0, 1), (1, 3), (3, 7), (3, 5), (5, 7)]

    def boom(lo, hi):
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):  # other errors are not retried
        split_on_oom(boom, 0, 4, join=sum, describe=str)


def test_oom_in_a_generation_batch_splits_it(llada_dir, monkeypatch):
    """A batch that does not fit is decoded in halves, down to single prompts: same answers, same order."""
    prompts = ["Short", "A much longer prompt, to force padding", "Mid length", "x", "last one"]
    reqs = [gen_req(p) for p in prompts]
    expected = DLLM(pretrained=llada_dir, batch_size=4).generate_until(reqs, disable_tqdm=True)
    real = lm_module.generate

    def tight_memory(model, prompt_ids, *args, **kwargs):
        if prompt_ids.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError(OOM)
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(lm_module, "generate", tight_memory)
    lm = DLLM(pretrained=llada_dir, batch_size=4)
    assert lm.generate_until(reqs, disable_tqdm=True) == expected
    assert [r.batch_size for r in lm.stats.requests] == [1] * 5
    assert lm.get_model_info()["dllm_stats"]["oom_splits"] == 3  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1; the 5th alone

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(lm_module, "generate", no_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=(
            "one prompt of 5 tokens \\+ gen_length=8 \\(13 positions\\) does not fit in GPU memory even alone "
            "\\(CUDA out of memory. Tried to allocate 2.00 GiB\\); lower gen_length")):
        lm.generate_until([gen_req("Short")], disable_tqdm=True)


def test_oom_in_likelihood_rows_splits_them(llada_dir, monkeypatch):
    reqs = [ll_req("The sky is", " blue"), ll_req("2+2=", "4")]
    expected = DLLM(pretrained=llada_dir, mc_num=8, mc_batch_size=8).loglikelihood(reqs, disable_tqdm=True)
    real = likelihood_module.masked_nll

    def tight_memory(model, ids, target, mask):
        if mask.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError(OOM)
        return real(model, ids, target, mask)

    monkeypatch.setattr(likelihood_module, "masked_nll", tight_memory)
    lm = DLLM(pretrained=llada_dir, mc_num=8, mc_batch_size=8)
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], abs=1e-5)
    assert lm.stats.likelihood_forward_passes == 2 * 4 and lm.stats.oom_splits == 2 * 3

    monkeypatch.setattr(likelihood_module, "masked_nll", lambda *a: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError(OOM)))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="one Monte-Carlo sample of 5 tokens \\(context 4 \\+ "
                                                          "continuation 1\\) does not fit in GPU memory even alone"):
        lm.loglikelihood([ll_req("2+2=", "4")], disable_tqdm=True)


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,msg", [
    ({"threshold": -0.1}, "threshold must be in \\[0, 1\\] \\(a probability\\), got -0.1"),
    ({"threshold": float("inf")}, "threshold must be a finite number, got inf"),
    ({"mc_num": 0}, "mc_num must be an integer >= 1, got 0"),
    ({"mc_batch_size": "many"}, "mc_batch_size='many': expected an integer"),
    ({"sampling_eps": 2}, "sampling_eps must be a number in \\[0, 1\\), got 2.0"),
    ({"is_check_greedy": "maybe"}, "is_check_greedy='maybe': expected a boolean"),
    ({"truncation": "left"}, "truncation='left': expected a boolean"),
    ({"max_length": 1}, "max_length must be an integer >= 2, got 1"),
])
def test_more_bad_arguments_fail_before_loading(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DLLM(pretrained=NOWHERE, **kw)


def test_prompt_longer_than_max_length(llada_dir):
    """An error by default; with truncation=True the prompt keeps its last max_length - gen_length tokens."""
    prompt = "0123456789" * 3  # 30 byte tokens
    with pytest.raises(ValueError, match=re.escape(
            f"prompt of 30 tokens + gen_length=8 exceeds max_length=20 (prompt starts {prompt!r}); raise max_length, "
            "shorten the prompt, or pass truncation=True to keep its last 12 tokens")):
        DLLM(pretrained=llada_dir, max_length=20).generate_until([gen_req(prompt)], disable_tqdm=True)
    cut = DLLM(pretrained=llada_dir, max_length=20, truncation=True).generate_until([gen_req(prompt)],
                                                                                  disable_tqdm=True)
    assert cut == DLLM(pretrained=llada_dir).generate_until([gen_req(prompt[-12:])], disable_tqdm=True)
    with pytest.raises(ValueError, match="max_gen_toks=24 \\(the generation budget, used as gen_length\\) from the "
                                         "task's generation_kwargs / --gen_kwargs leaves no room for a prompt in "
                                         "max_length=20"):
        DLLM(pretrained=llada_dir, max_length=20, truncation=True).generate_until([gen_req("x", 24)])


def test_empty_prompt(llada_dir, dream_dir):
    """LLaDA decodes from nothing; Dream (row t-1 predicts t) needs one token: an error naming the fix, and with
    add_bos_token=True the prompt is [BOS]."""
    llada = DLLM(pretrained=llada_dir)
    [text] = llada.generate_until([gen_req("")], disable_tqdm=True)
    assert isinstance(text, str)
    # in a batch the empty prompt is a row of padding only: it still gets exactly what it gets alone
    assert DLLM(pretrained=llada_dir, batch_size=2).generate_until([gen_req("Hi"), gen_req("")], disable_tqdm=True) \
        == [llada.generate_until([gen_req("Hi")], disable_tqdm=True)[0], text]
    with pytest.raises(ValueError, match="empty prompt: Dream predicts each position from the one before it, so it "
                                         "needs at least one prompt token \\(e.g. BOS: add_bos_token=True\\)"):
        DLLM(pretrained=dream_dir).generate_until([gen_req("")], disable_tqdm=True)
    bos = DLLM(pretrained=dream_dir, add_bos_token=True)
    bos_id = bos.tokenizer.bos_token_id
    assert bos.tok_encode("") == [bos_id] and bos.tok_encode("a") == [bos_id, 97]
    alone = [bos.generate_until([gen_req(p)], disable_tqdm=True)[0] for p in ("", "a")]
    batched = DLLM(pretrained=dream_dir, add_bos_token=True, batch_size=2)
    assert batched.generate_until([gen_req(""), gen_req("a")], disable_tqdm=True) == alone


def test_any_unicode_and_control_characters(llada_dir):
    """Control characters, NUL, bidi overrides, emoji, CJK are encoded as they are (one answer each); a lone
    surrogate, which UTF-8 cannot carry, becomes U+FFFD."""
    lm = DLLM(pretrained=llada_dir, mc_num=4, mc_batch_size=4)
    prompts = ["\x00\x01\x07\x1b[31m", "\u202eevil\u202c \u200b", "😀 中文 é\r\n\t", "\ud800 lone", "\ufffd lone"]
    assert lm.tok_encode("\x00\x1b\u202e") == list("\x00\x1b\u202e".encode())
    assert lm.tok_encode("\ud800 lone") == lm.tok_encode("\ufffd lone")
    out = lm.generate_until([gen_req(p) for p in prompts], disable_tqdm=True)
    assert len(out) == 5 and all(isinstance(t, str) for t in out) and out[3] == out[4]
    # one batch of all five gives each exactly its batch-size-1 answer
    assert DLLM(pretrained=llada_dir, batch_size=5).generate_until([gen_req(p) for p in prompts],
                                                                   disable_tqdm=True) == out
    lls = lm.loglikelihood([ll_req(p, " \x00😀") for p in prompts], disable_tqdm=True)
    assert all(math.isfinite(v) for v, _ in lls) and lls[3] == lls[4]


# --- determinism ---------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_at_a_fixed_seed(llada_dir):
    """temperature > 0: the same seed and batch size give the same answers run after run; another seed gives
    others. (Batch size and process count change which random numbers a request draws: docs/usage.md.)"""
    reqs = [gen_req(p, 16) for p in ("Once upon", "The cat", "1, 2, 3,")]

    def run(seed):
        return DLLM(pretrained=llada_dir, temperature=1.0, seed=seed, batch_size=2).generate_until(
            reqs, disable_tqdm=True)

    first = run(5)
    assert run(5) == first
    assert run(6) != first


# --- resume --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_a_crash(llada_dir, tmp_path):
    """A run SIGKILLed after 5 of 12 loglikelihood results reached the --use_cache database resumes: the rerun
    computes only the 7 missing ones (and no generation), and every answer equals an uninterrupted run's."""
    tasks = local_tasks.write_tasks(str(tmp_path))
    cli = local_tasks.write_cli(str(tmp_path))
    cache = tmp_path / "cache" / "dllm"
    model_args = f"pretrained={llada_dir},mc_num=8,mc_batch_size=8,gen_length=8,block_length=8"
    argv = ["--model", "dllm", "--model_args", model_args, "--tasks", "tiny_gen,tiny_mc", "--include_path", tasks,
            "--use_cache", str(cache), "--output_path", str(tmp_path / "out"), "--log_samples"]
    python = local_tasks.BIN + "/python"
    crashed = local_tasks.run([python, cli, "--kill-after-cached", "5", *argv], cwd=str(tmp_path))
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    with sqlite3.connect(f"{cache}_rank0.db") as db:
        assert db.execute("SELECT count(*) FROM unnamed").fetchone() == (4 + 5,)  # all generations, 5 choices

    resumed = local_tasks.run([python, cli, *argv], cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Cached requests: 5, Requests remaining: 7" in resumed.stderr
    stats = local_tasks.read_results(str(tmp_path / "out"))["config"]["dllm_stats"]
    assert stats["requests"] == 0 and stats["likelihood"]["requests"] == 7

    lm = DLLM(pretrained=llada_dir, mc_num=8, mc_batch_size=8, gen_length=8, block_length=8)
    mc = local_tasks.read_samples(str(tmp_path / "out"), "tiny_mc")
    reqs = [ll_req(a["arg_0"], a["arg_1"]) for s in mc for a in s["arguments"].values()]
    assert [float(ll) for s in mc for [[ll, _]] in s["resps"]] == [v for v, _ in lm.loglikelihood(reqs)]
    gen = local_tasks.read_samples(str(tmp_path / "out"), "tiny_gen")
    reqs = [Instance("generate_until", {}, tuple(s["arguments"]["gen_args_0"].values()), 0) for s in gen]
    assert [s["resps"][0][0] for s in gen] == lm.generate_until(reqs, disable_tqdm=True)


# --- batch_size=auto -----------------------------------------------------------------------------------------------


def tight_memory(monkeypatch, budget):
    """CUDA behaviour on the CPU: ``generate`` on more than ``budget`` prompt positions (batch x prompt width) runs
    out of memory. Returns the batch sizes ``generate`` was called with."""
    real, calls = lm_module.generate, []

    def generate(model, prompt_ids, *args, **kwargs):
        calls.append(prompt_ids.shape[0])
        if prompt_ids.numel() > budget:
            raise torch.cuda.OutOfMemoryError(OOM)
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(lm_module, "generate", generate)
    monkeypatch.setattr(lm_module, "_probes_memory", lambda device: True)
    return calls


def test_batch_size_auto_finds_the_largest_batch_that_fits(llada_dir, monkeypatch):
    """From max_batch_size (64) down, halving on out-of-memory, with one real decoding step: exactly 8 when more
    than 8 prompts do not fit; the answers are those of batch size 1."""
    reqs = [gen_req("same length %02d" % i) for i in range(20)]
    expected = DLLM(pretrained=llada_dir, batch_size=1).generate_until(reqs, disable_tqdm=True)
    width = len(DLLM(pretrained=llada_dir).tok_encode("same length 00"))
    calls = tight_memory(monkeypatch, budget=8 * width)
    lm = DLLM(pretrained=llada_dir, batch_size="auto")
    assert lm.generate_until(reqs, disable_tqdm=True) == expected
    assert calls[:4] == [64, 32, 16, 8] and calls[4:] == [8, 8, 4]  # the probes, then the batches
    assert [r.batch_size for r in lm.stats.requests] == [8] * 16 + [4] * 4 and lm.stats.oom_splits == 0
    assert list(lm.batch_sizes.values()) == [8]  # lm-eval puts these in results["config"]["batch_sizes"]


def test_batch_size_auto_n_detects_again_on_shorter_prompts(llada_dir, monkeypatch):
    """auto:2: the sorted requests in two halves, detected at the start of each on its longest prompt (HFLM's
    schedule); a max_batch_size caps the first try."""
    reqs = [gen_req("L" * 30 + "%02d" % i) for i in range(8)] + [gen_req("s%02d" % i) for i in range(8)]
    long_width = len(DLLM(pretrained=llada_dir).tok_encode(reqs[0].args[0]))
    calls = tight_memory(monkeypatch, budget=4 * long_width)
    lm = DLLM(pretrained=llada_dir, batch_size="auto:2", max_batch_size=16)
    lm.generate_until(reqs, disable_tqdm=True)
    assert calls == [16, 8, 4, 4, 4, 16, 8]  # probes 16, 8, 4 fits; two batches of 4; probe 16 fits; one of 8
    assert [r.batch_size for r in lm.stats.requests] == [4] * 8 + [8] * 8
    assert list(lm.batch_sizes.values()) == [4, 16]


def test_batch_size_auto_on_the_cpu_is_a_fixed_logged_value(llada_dir, monkeypatch, caplog):
    calls = []
    real = lm_module.generate
    monkeypatch.setattr(lm_module, "generate", lambda model, ids, *a, **k: calls.append(ids.shape[0]) or real(
        model, ids, *a, **k))
    lm = DLLM(pretrained=llada_dir, batch_size="auto", device="cpu")
    with caplog.at_level("INFO", logger="lm_eval.models.dllm"):
        lm.generate_until([gen_req("q%02d" % i) for i in range(10)], disable_tqdm=True)
    assert calls == [lm_module.CPU_AUTO_BATCH_SIZE, 2] == [8, 2]  # no probe
    assert "batch_size=auto on cpu: 8 (no out-of-memory signal to probe there" in caplog.text
    assert DLLM(pretrained=llada_dir, batch_size="auto", max_batch_size=3)._detect_batch_size("x", None, None) == 3


def test_largest_batch():
    def fits_up_to(limit):
        def fits(n):
            if n > limit:
                raise torch.cuda.OutOfMemoryError(OOM)
        return fits

    assert [lm_module.largest_batch(fits_up_to(k), 64) for k in (100, 64, 63, 8, 1, 0)] == [64, 64, 32, 8, 1, 1]
    with pytest.raises(RuntimeError, match="not memory"):
        lm_module.largest_batch(lambda n: (_ for _ in ()).throw(RuntimeError("not memory")), 8)
