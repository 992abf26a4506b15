"""The lm-eval glue (lmeval_dllm/lm.py): argument validation before any model work, generate_until plumbing
(order, batching, stop strings, chat templates), statistics."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance

from lmeval_dllm.lm import DLLM


def make(llada_dir, **kw):
    return DLLM(pretrained=llada_dir, **kw)


def req(context, i=0, **gen_kwargs):
    gen = {"until": ["\n\n"], "max_gen_toks": 16, **gen_kwargs}
    return Instance("generate_until", {}, (context, gen), i)


# --- validation, all before the checkpoint is touched (a nonexistent path proves it) ------------------------------

NOWHERE = "/nonexistent/checkpoint"


@pytest.mark.parametrize("kw,err,msg", [
    ({"threshhold": 0.9}, ValueError, "unknown parameter 'threshhold' in --model_args for strategy 'vanilla'; did you "
                                      "mean 'threshold'\\? accepted decoding parameters: alg, block_length"),
    ({"strategy": "wno"}, ValueError, "unknown strategy 'wno'"),
    ({"strategy": "vanila"}, ValueError, "unknown strategy 'vanila'; did you mean 'vanilla'\\? available: vanilla"),
    ({"cache": "duel"}, ValueError, "unknown cache 'duel'"),
    ({"threshold": "high"}, ValueError, "threshold='high': expected a number or None"),
    ({"threshold": 1.5}, ValueError, "threshold must be in \\[0, 1\\] \\(a probability\\), got 1.5"),
    ({"threshold": float("nan")}, ValueError, "threshold must be a finite number, got nan"),
    ({"gen_length": 100, "block_length": 32}, ValueError, "gen_length=100 is not divisible by block_length=32"),
    ({"gen_length": 64, "steps": 7}, ValueError, "steps=7 must be at most gen_length=64 and divisible"),
    ({"temperature": -0.5}, ValueError, "temperature must be a finite number >= 0, got -0.5"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, 'auto' or 'auto:N', got 0"),
    ({"batch_size": "many"}, ValueError, "batch_size='many': expected an integer >= 1, 'auto' or 'auto:N'"),
    ({"batch_size": "auto:0"}, ValueError, "batch_size='auto:0': expected an integer >= 1, 'auto', or 'auto:N'"),
    ({"batch_size": "auto:x"}, ValueError, "batch_size='auto:x': expected an integer >= 1, 'auto', or 'auto:N'"),
    ({"batch_size": "auto", "max_batch_size": 0}, ValueError, "max_batch_size must be an integer >= 1, got 0"),
    ({"gen_length": 0}, ValueError, "gen_length must be an integer >= 1, got 0"),
    ({"block_length": 0}, ValueError, "block_length must be an integer >= 1, got 0"),
    ({"gen_length": 64, "block_length": 0}, ValueError, "block_length must be an integer >= 1, got 0"),
    ({"device": "tpu:0"}, ValueError, "device='tpu:0': expected cpu, cuda, cuda:N or auto"),
    ({"dtype": "fp8"}, ValueError, "dtype='fp8': expected one of auto, bfloat16"),
    ({"trust_remote_code": "maybe"}, ValueError, "trust_remote_code='maybe': expected a boolean"),
])
def test_bad_arguments_fail_before_loading(kw, err, msg):
    with pytest.raises(err, match=msg):
        DLLM(pretrained=NOWHERE, **kw)


def test_missing_checkpoint_is_a_clear_error():
    with pytest.raises(OSError, match="pretrained='/nonexistent/checkpoint' is not a local directory and could not be "
                                      "fetched from the Hugging Face hub"):
        DLLM(pretrained=NOWHERE)


def test_unknown_gen_kwarg_is_an_error(llada_dir):
    lm = make(llada_dir)
    with pytest.raises(ValueError, match="unknown parameter 'num_beams' in the task's generation_kwargs"):
        lm.generate_until([req("Hello", num_beams=4)])
    with pytest.raises(ValueError, match="top_k=0|top_k must be an integer >= 1"):
        lm.generate_until([req("Hello", top_k=0)])


# --- generate_until --------------------------------------------------------------------------------------------


def test_one_answer_per_request_in_order_and_batch_size_invariant(llada_dir):
    prompts = ["Short", "A much longer prompt than the others, to force padding", "Mid length one", "x"]
    requests = [req(p, i) for i, p in enumerate(prompts)]
    one = make(llada_dir, batch_size=1, gen_length=16, block_length=8).generate_until(requests, disable_tqdm=True)
    three = make(llada_dir, batch_size=3, gen_length=16, block_length=8).generate_until(requests, disable_tqdm=True)
    assert len(one) == 4 and one == three
    # and each equals the prompt decoded alone
    for i, p in enumerate(prompts):
        assert make(llada_dir, gen_length=16, block_length=8).generate_until([req(p)], disable_tqdm=True) == [one[i]]


def test_stop_strings_cut_the_answer(llada_dir):
    lm = make(llada_dir, gen_length=16, block_length=16)
    raw = lm.generate_until([Instance("generate_until", {}, ("Tell me", {"until": [], "max_gen_toks": 16}), 0)],
                            disable_tqdm=True)[0]
    assert len(raw) >= 3
    cut_at = raw[2]
    cut = lm.generate_until([Instance("generate_until", {}, ("Tell me", {"until": [cut_at], "max_gen_toks": 16}), 0)],
                            disable_tqdm=True)[0]
    assert cut == raw.split(cut_at)[0]


def test_answer_is_cut_at_the_first_stop_token(llada_dir):
    lm = make(llada_dir)
    tok = lm.tokenizer
    # the loop passes the tokens before the first EOS/EoT (answer_length); special tokens never reach the text
    text = lm._postprocess(tok.encode("ab", add_special_tokens=False) + [tok.mask_token_id] + tok.encode("cd"), [])
    assert text == "abcd"
    assert lm._postprocess(tok.encode("x: 1\n\nQuestion: y", add_special_tokens=False), ["Question:", "\n\n"]) == "x: 1"


def test_max_gen_toks_is_the_default_gen_length(llada_dir):
    lm = make(llada_dir)
    lm.generate_until([req("Hi", max_gen_toks=24)], disable_tqdm=True)
    # 24 is not a multiple of the default block length 32: one block of 24
    assert [r.gen_length for r in lm.stats.requests] == [24]
    lm = make(llada_dir, gen_length=8, block_length=4)
    lm.generate_until([req("Hi", max_gen_toks=24)], disable_tqdm=True)
    assert [r.gen_length for r in lm.stats.requests] == [8]  # --model_args beats the task


def test_statistics(llada_dir, tmp_path):
    path = tmp_path / "stats" / "requests.jsonl"
    lm = make(llada_dir, gen_length=16, block_length=8, batch_size=2, stats_path=str(path))
    lm.generate_until([req("a", 0), req("bb", 1), req("ccc", 2)], disable_tqdm=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and all(r["gen_length"] == 16 for r in rows)
    assert all(1 <= r["nfe"] <= 16 and r["answer_tokens"] <= 16 for r in rows)
    assert [r["batch_size"] for r in rows] == [2, 2, 1]
    s = lm.get_model_info()["dllm_stats"]
    assert s["requests"] == 3 and s["batches"] == 2
    assert s["tokens_per_step"] == pytest.approx(sum(r["answer_tokens"] for r in rows) / sum(r["nfe"] for r in rows))


def test_chat_template_and_bos(llada_dir):
    lm = make(llada_dir)
    text = lm.apply_chat_template([{"role": "user", "content": "Hi "}])
    assert text == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = lm.tok_encode(text)
    assert ids.count(lm.tokenizer.bos_token_id) == 1
    assert make(llada_dir, add_bos_token=True).tok_encode(text).count(lm.tokenizer.bos_token_id) == 1
    # gen_prefix: continue the assistant message instead of opening a new one
    cont = lm.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure:"}],
                                  add_generation_prompt=False)
    assert cont.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSure:")


def test_stop_tokens_include_end_of_turn(llada_dir, dream_dir):
    assert make(llada_dir).stop_token_ids.tolist() == [257, 258]  # <|endoftext|>, <|eot_id|>
    assert make(dream_dir).stop_token_ids.tolist() == [256, 258]  # <|endoftext|>, <|im_end|>


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_request_without_cuda_is_an_error_before_loading(device, monkeypatch):
    """It used to warn and run on the CPU (a GPU benchmark silently measured the CPU). ``cuda:0`` is lm-eval's
    command-line default (passed when no --device is given): that one still falls back, with a warning."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=f"^device='{device}': CUDA is not available on this machine \\(torch sees "
                                         f"no GPU\\); available: cpu$"):
        DLLM(pretrained=NOWHERE, device=device)


def test_lm_evals_default_device_falls_back_to_the_cpu(llada_dir, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with caplog.at_level("WARNING", logger="lm_eval.models.dllm"):
        assert make(llada_dir, device="cuda:0").device == torch.device("cpu")
    assert "device=cuda:0 (lm-eval's default when no --device is given) but torch sees no GPU" in caplog.text


def test_cuda_index_past_the_devices_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="^device='cuda:2': this machine has 2 CUDA device\\(s\\); available: cpu, "
                                         "cuda, cuda:0, cuda:1$"):
        DLLM(pretrained=NOWHERE, device="cuda:2")


def test_model_info_for_results_json(llada_dir):
    info = make(llada_dir, stats_path="x.jsonl").get_model_info()
    assert info["dllm_strategy"] == "vanilla" and info["dllm_cache"] == "none" and info["dllm_stats_path"] == "x.jsonl"
    assert info["dllm_stats"] == {"requests": 0}


def test_split_gen_kwargs_standard_keys_and_no_mutation():
    from lmeval_dllm.lm import split_gen_kwargs

    task = {"until": ["Q:"], "max_new_tokens": 64, "do_sample": False, "temperature": 0.7, "gen_length": 32}
    kwargs, until, budget = split_gen_kwargs(task)
    assert (kwargs, until, budget) == ({"temperature": 0.0, "gen_length": 32}, ["Q:"], 64)
    until.append("<eos>")
    assert task["until"] == ["Q:"]  # the task's list is untouched
    assert split_gen_kwargs({"until": "\n"}) == ({}, ["\n"], 256)
    assert split_gen_kwargs({"do_sample": True, "temperature": 0.5})[0] == {"temperature": 0.5}


# --- lengths: 0 is a value, decisions are logged once, lengths fit the model before any work ------------------------


@pytest.mark.parametrize("gen_kwargs, msg", [
    ({"gen_length": 0}, "gen_length must be an integer >= 1, got 0"),      # was: `or` -> max_gen_toks
    ({"block_length": 0}, "block_length must be an integer >= 1, got 0"),  # was: `or` -> 32
    ({"max_gen_toks": 0}, "max_gen_toks=0 in the task's generation_kwargs / --gen_kwargs: the generation budget must"),
])
def test_zero_in_the_task_is_an_error_not_a_default(llada_dir, gen_kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make(llada_dir).generate_until([req("Hi", **gen_kwargs)], disable_tqdm=True)


def test_one_block_decision_is_logged_once(llada_dir, caplog):
    lm = make(llada_dir)
    with caplog.at_level("INFO", logger="lm_eval.models.dllm"):
        lm.generate_until([req("Hi", max_gen_toks=24)], disable_tqdm=True)
        lm.generate_until([req("Ho", max_gen_toks=24)], disable_tqdm=True)
    note = "gen_length=24 is not a multiple of the default block_length=32 and no block_length was given: one block"
    assert caplog.text.count(note) == 1


def no_model_work(monkeypatch):
    from lmeval_dllm import lm as lm_module

    def fail(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(lm_module, "generate", fail)


def test_a_length_that_cannot_fit_fails_before_any_work(llada_dir, monkeypatch):
    with pytest.raises(ValueError, match="^gen_length=600 from --model_args leaves no room for a prompt in "
                                         "max_length=512"):
        make(llada_dir, max_length=512, gen_length=600, block_length=600)  # at start-up
    lm = make(llada_dir, max_length=512)
    no_model_work(monkeypatch)
    with pytest.raises(ValueError, match="^max_gen_toks=512 \\(the generation budget, used as gen_length\\) from the "
                                         "task's generation_kwargs / --gen_kwargs leaves no room"):
        lm.generate_until([req("Hi"), req("Hi", max_gen_toks=512)], disable_tqdm=True)
    with pytest.raises(ValueError, match="^max_gen_length=2048 from --model_args leaves no room for a prompt in "
                                         "max_length=512; pass max_gen_length=<at most 511> \\(e.g. 256\\)"):
        make(llada_dir, max_length=512, strategy="daedal", max_gen_length=2048)


def test_daedal_default_fits_the_model(llada_dir, caplog):
    with caplog.at_level("INFO", logger="lm_eval.models.dllm"):
        lm = make(llada_dir, max_length=512, strategy="daedal")
    assert "the default max_gen_length=2048 does not fit max_length=512: max_gen_length=256" in caplog.text
    _, sampler, _ = lm._decoding_for({"until": ["\n\n"], "max_gen_toks": 16})
    assert (sampler.max_gen_length, sampler.initial_gen_length) == (256, 64)
    assert make(llada_dir, strategy="daedal")._decoding_for({})[1].max_gen_length == 2048  # max_length 4096


# --- the model family decides (lmeval_dllm.models.FAMILIES) -----------------------------------------------------


def test_a_family_without_likelihood_runs_generation_and_names_the_gap(llada_dir, tmp_path, monkeypatch):
    """A newly registered family with no likelihood scheme loads and generates; only loglikelihood requests fail,
    with the reason (a new family once crashed in likelihood.py at model construction)."""
    import dataclasses
    import shutil

    from lmeval_dllm import models

    gen_only = dataclasses.replace(models.FAMILIES["llada"], name="llada_gen", model_types=("llada_gen",),
                                   architectures=("LLaDAGenModelLM",), likelihood=None)
    monkeypatch.setitem(models.FAMILIES, "llada_gen", gen_only)
    d = str(tmp_path / "gen-only")
    shutil.copytree(llada_dir, d)
    cfg = json.load(open(f"{d}/config.json"))
    cfg.update(model_type="llada_gen", architectures=["LLaDAGenModelLM"])
    json.dump(cfg, open(f"{d}/config.json", "w"))
    lm = make(d, gen_length=8, block_length=8)
    assert lm.family is gen_only
    assert lm.generate_until([req("Hello")], disable_tqdm=True) == \
        make(llada_dir, gen_length=8, block_length=8).generate_until([req("Hello")], disable_tqdm=True)
    with pytest.raises(ValueError, match=r"^model family 'llada_gen' has no likelihood scheme \(Family.likelihood "
                                         r"is None\): loglikelihood / multiple-choice tasks cannot run on it"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("Hello", " world"), 0)])


def test_likelihood_scheme_and_end_of_turn_come_from_the_family(llada_dir, dream_dir):
    llada, dream = make(llada_dir), make(dream_dir)
    assert (llada.estimator.scheme, dream.estimator.scheme) == ("llada", "dream")
    assert llada.tokenizer.convert_ids_to_tokens(llada._eot_id()) == "<|eot_id|>"
    assert dream.tokenizer.convert_ids_to_tokens(dream._eot_id()) == "<|im_end|>"


def test_engine_options_reach_the_model_and_the_cache(llada_dir):
    lm = make(llada_dir, cache="dual", cuda_graphs=False, fuse="false")
    assert not lm.cache.graphs.enabled and not lm.cache.block_graphs.enabled and lm.model.fuse is False
    assert make(llada_dir, cache="dual").cache.graphs.enabled
