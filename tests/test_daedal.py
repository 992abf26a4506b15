"""DaedalSampler (lmeval_dllm/samplers/daedal.py) and the loop's variable-length support it uses
(``DecodeState.insert``, the ``CanvasEdit`` a step returns): hand-built logits, a scripted decode with known growth and
insertions, batches, the tiny checkpoints and the lm_eval command line."""

from __future__ import annotations

import math

import pytest
import torch
from batches import left_pad
from scripted import logit_rows

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.state import DecodeState
from lmeval_dllm.samplers.daedal import eos_confidence

V, MASK, EOS = 32, 31, 30
NEVER = torch.tensor([10**6])  # a stop token that never occurs: decode every block


def daedal(eos=EOS, **kw):
    return build_sampler("daedal", Proposal.from_params().bind(eos, None), **kw)


# --- the EOS confidence and the canvas edit --------------------------------------------------------------------


def test_eos_confidence_averages_the_rightmost_eos_predictions_over_k():
    row0 = logit_rows([0.5, 0.9, 0.5, 0.8, 0.7, 0.6], [1, EOS, 2, EOS, EOS, EOS])
    row1 = logit_rows([0.9, 0.5, 0.5, 0.5, 0.5, 0.95], [EOS, 1, 2, 3, 4, EOS])
    conf = eos_confidence(torch.stack([row0, row1]), torch.tensor([6, 4]), EOS, last=3)
    # row 0: the last three EOS predictions (0.8, 0.7, 0.6) / 3; row 1: column 5 is past its length of 4,
    # so one prediction (0.9), still divided by 3
    assert torch.allclose(conf, torch.tensor([0.7, 0.3]), atol=1e-6)


def _state(gen_rows, prompt_rows=((1, 2), (0, 3)), prompt_mask=((True, True), (False, True))):
    x = torch.tensor([list(p) + g for p, g in zip(prompt_rows, gen_rows)])
    am = torch.cat([torch.tensor(prompt_mask), torch.ones(len(gen_rows), len(gen_rows[0]), dtype=torch.bool)], 1)
    s = DecodeState(x=x, position_ids=(am.long().cumsum(-1) - 1).clamp(min=0), attention_mask=am, prompt_len=2,
                    mask_token_id=MASK, stop_token_ids=torch.tensor([EOS]))
    s.decoded_at = torch.tensor([[-1, -1, 0, 1, 2, 3], [-1, -1, 4, 5, 6, 7]])
    return s


def test_insert_shifts_rows_apart_and_hides_the_pad():
    s = _state([[10, 11, 12, 13], [20, 21, 22, 23]])
    s.insert(torch.tensor([1, 4]), torch.tensor([2, 3]), torch.tensor([MASK, EOS]), pad_token_id=EOS, max_length=6)
    assert s.x[:, 2:].tolist() == [[10, MASK, MASK, 11, 12, 13], [20, 21, 22, 23, EOS, EOS]]  # row 1 capped at 6
    assert s.gen_lengths.tolist() == [6, 6]
    assert s.decoded_at[:, 2:].tolist() == [[0, -1, -1, 1, 2, 3], [4, 5, 6, 7, -1, -1]]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 3, 4, 5, 6]]
    # an insertion near the cap drops what is pushed past it; the other row keeps its length
    s.insert(torch.tensor([0, 0]), torch.tensor([2, 0]), MASK, pad_token_id=EOS, max_length=6)
    assert s.x[:, 2:].tolist() == [[MASK, MASK, 10, MASK, MASK, 11], [20, 21, 22, 23, EOS, EOS]]
    # growing one row past the others: the short row's new columns are pad, hidden and undecided
    s.insert(torch.tensor([6, 6]), torch.tensor([0, 0]), MASK, pad_token_id=EOS)  # nothing to do: unchanged
    assert s.x.shape == (2, 8)
    s.insert(torch.tensor([6, 6]), torch.tensor([2, 0]), MASK, pad_token_id=EOS)
    assert s.x[:, 2:].tolist() == [[MASK, MASK, 10, MASK, MASK, 11, MASK, MASK], [20, 21, 22, 23, EOS, EOS, EOS, EOS]]
    assert s.gen_lengths.tolist() == [8, 6]
    assert s.attention_mask.tolist() == [[True] * 10, [False] + [True] * 7 + [False, False]]
    assert s.decoded_at[1, 2:].tolist() == [4, 5, 6, 7, -1, -1, -1, -1]
    assert s.position_ids[1].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]


# --- one step on hand-built logits -----------------------------------------------------------------------------


def _step(conf, tokens, gen=None, lengths=None, **kw):
    """One stage-2 step of a single row whose generation region is ``gen`` (all masks by default) and whose
    current block is its first four columns."""
    G = len(conf)
    gen = gen or [MASK] * G
    x = torch.tensor([[1, 2] + gen])
    s = DecodeState(x=x, position_ids=torch.arange(x.shape[1])[None], attention_mask=None, prompt_len=2,
                    mask_token_id=MASK, stop_token_ids=torch.tensor([EOS]))
    sampler = daedal(**{"initial_gen_length": G, **kw})
    sampler.start(s)
    s.sampler_state["sized"][:] = True
    if lengths is not None:
        s.gen_lengths = torch.tensor(lengths)
    s.block, s.active = slice(2, 6), torch.tensor([True])
    return sampler.step(logit_rows(conf, tokens)[None], s), s


def test_stage2_commits_above_threshold_and_picks_the_least_confident_expansion_point():
    # block: 0.95 and 0.92 pass 0.9; 0.05 and 0.02 are under 0.1: the lower one expands. Columns 4-7 predict EOS
    # with 0.6 each: EOS confidence 0.6 < 0.9
    out, s = _step([0.95, 0.05, 0.92, 0.02, 0.6, 0.6, 0.6, 0.6], [10, 11, 12, 13, EOS, EOS, EOS, EOS],
                   num_check_last_eot=4, max_gen_length=16)
    assert out.commit[0].tolist() == [True, False, True, False] + [False] * 4
    assert out.tokens[0, :4].tolist()[::2] == [10, 12]
    # the expansion point becomes expansion_factor (8) masks: 7 inserted before column 3
    assert (out.edit.at.tolist(), out.edit.count.tolist(), out.edit.token_ids.tolist()) == ([3], [7], [MASK])


def test_stage2_commits_the_best_one_below_threshold_and_no_expansion_when_eos_is_confident():
    out, s = _step([0.5, 0.05, 0.7, 0.02, 0.95, 0.95, 0.95, 0.95], [10, 11, 12, 13, EOS, EOS, EOS, EOS],
                   num_check_last_eot=4, max_gen_length=16)
    assert out.commit[0].tolist() == [False, False, True, False] + [False] * 4
    assert out.edit.count.tolist() == [0]  # EOS confidence 0.95 >= 0.9: no expansion
    out, s = _step([0.5, 0.05, 0.7, 0.02, 0.6, 0.6, 0.6, 0.6], [10, 11, 12, 13, EOS, EOS, EOS, EOS],
                   num_check_last_eot=4, max_gen_length=8)
    assert out.edit.count.tolist() == [0]  # at max_gen_length


def test_stage2_never_commits_a_predicted_mask():
    # columns 0 and 2 predict [MASK] above the threshold: the best real prediction (column 1) is committed
    out, _ = _step([0.99, 0.3, 0.97, 0.2, 0.6, 0.6, 0.6, 0.6], [MASK, 11, MASK, 13, EOS, EOS, EOS, EOS],
                   num_check_last_eot=4)
    assert out.commit[0, :4].tolist() == [False, True, False, False]
    # every candidate predicts [MASK]: the release fills the one whose best other token is likeliest
    conf, tokens = [0.99, 0.5, 0.97, 0.9, 0.6, 0.6, 0.6, 0.6], [MASK] * 4 + [EOS] * 4
    logits = logit_rows(conf, tokens)
    logits[1, 7] = math.log(0.45)  # column 1: second best token 7 with 0.45 (the others ~0.05 / 30)
    x = torch.tensor([[1, 2] + [MASK] * 8])
    s = DecodeState(x=x, position_ids=torch.arange(10)[None], attention_mask=None, prompt_len=2, mask_token_id=MASK,
                    stop_token_ids=torch.tensor([EOS]))
    sampler = daedal(num_check_last_eot=4)
    sampler.start(s)
    s.sampler_state["sized"][:] = True
    s.block, s.active = slice(2, 6), torch.tensor([True])
    out = sampler.step(logits[None], s)
    assert out.commit[0, :4].tolist() == [False, True, False, False] and out.tokens[0, 1].item() == 7


@pytest.mark.parametrize("kw,msg", [
    ({"initial_gen_length": 0}, "initial_gen_length must be an integer >= 1, got 0"),
    ({"initial_gen_length": 64, "max_gen_length": 32}, "max_gen_length must be >= initial_gen_length=64, got 32"),
    ({"threshold": 1.2}, r"threshold must be in \[0, 1\] \(a probability\), got 1.2"),
    ({"initial_eot_expand_thres": -1.0}, r"initial_eot_expand_thres must be in \[0, 1\]"),
    ({"decode_eot_expand_thres": 2.0}, r"decode_eot_expand_thres must be in \[0, 1\]"),
    ({"low_conf_expand_thres": 1.5}, r"low_conf_expand_thres must be in \[0, 1\]"),
    ({"num_check_last_eot": 0}, "num_check_last_eot must be an integer >= 1, got 0"),
    ({"expansion_factor": 0}, "expansion_factor must be an integer >= 1, got 0"),
    ({"eos_check_tokens": 32}, "unknown parameter 'eos_check_tokens' for strategy 'daedal'"),
    ({"num_transfer_tokens": 2}, "unknown parameter 'num_transfer_tokens' for strategy 'daedal'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        daedal(**kw)


def test_lengths_are_the_strategys_own():
    model = Script([dict(want=3)])
    with pytest.raises(ValueError, match="strategy 'daedal' chooses the generation length itself: give "
                                         "gen_length=None"):
        generate(model, torch.tensor([[1, 2]]), None, daedal(), GenerationConfig(64, 32), stop_token_ids=NEVER)
    with pytest.raises(ValueError, match="strategy 'vanilla' needs a gen_length"):
        generate(model, torch.tensor([[1, 2]]), None, build_sampler("vanilla", Proposal.from_params()),
                 GenerationConfig(None, 32), stop_token_ids=NEVER)
    with pytest.raises(ValueError, match="needs the EOS token id"):
        generate(model, torch.tensor([[1, 2]]), None, build_sampler("daedal", Proposal.from_params()),
                 GenerationConfig(None, 32), stop_token_ids=NEVER)


def test_lm_eval_model_rejects_gen_length_and_caches_before_loading_anything():
    from lmeval_dllm.lm import DLLM

    with pytest.raises(ValueError, match="strategy 'daedal' chooses each answer's length itself .* remove "
                                         "gen_length=256"):
        DLLM(pretrained="/nonexistent", strategy="daedal", gen_length=256)


# --- a scripted decode: growth, the EOS tail, an insertion after decoded tokens --------------------------------


class Script:
    """Stands in for a DiffusionLM. Per row: generation column j predicts EOS (0.7) if it holds EOS or
    j >= ``want``, else token 10 + j with 0.95, except column ``unsure``, which has 0.05 while the row is shorter
    than ``sure_at``. A row's length is read from the attention mask, as the model sees it."""

    logit_shift, mask_token_id, device, dtype = 0, MASK, torch.device("cpu"), torch.float32
    block_size = None  # bidirectional (DiffusionLM.block_size)

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def predict(self, input_ids, position_ids, targets, *, attention_mask=None, cache=None, query_start=0):
        self.calls += 1
        P = targets.start
        out = []
        for b, spec in enumerate(self.rows):
            gen = input_ids[b, P:targets.stop].tolist()
            n = len(gen) if attention_mask is None else int(attention_mask[b, P:].sum())
            conf, tok = [], []
            for j, t in enumerate(gen):
                if t == EOS or j >= spec["want"]:
                    conf.append(0.7), tok.append(EOS)
                elif j == spec.get("unsure") and n < spec["sure_at"]:
                    conf.append(0.05), tok.append(10 + j)
                else:
                    conf.append(0.95), tok.append(10 + j)
            out.append(logit_rows(conf, tok))
        return torch.stack(out)


SETTINGS = dict(initial_gen_length=4, max_gen_length=24, expansion_factor=4, num_check_last_eot=4)
ROW_A = dict(want=7, unsure=5, sure_at=17)  # grows 4 -> 8 -> 12, tail -> 14; one insertion at column 5 -> 17
ROW_B = dict(want=3)  # grows 4 -> 8, tail -> 10


def test_scripted_growth_tail_and_insertion_after_the_first_stage2_step():
    """Stage 1: EOS confidence 0 (4 columns), 0.7 / 4 (8), 0.7 (12 >= 0.5): two growths of 4, then the tail of
    4 // 2 EOS. Stage 2, block 0: all committed (step 3). Block 1 (step 4): 14 and 16 committed, column 5 (0.05)
    becomes 4 masks (§14.8: an insertion after tokens were decoded; the reference's statistic was NaN there).
    Step 5: 15, 16 (now sure); step 6: EOS at 7 ends the answer."""
    model = Script([ROW_A])
    out = generate(model, torch.tensor([[1, 2, 3]]), None, daedal(**SETTINGS), GenerationConfig(None, 4),
                   stop_token_ids=torch.tensor([EOS]))
    assert out.tokens[0, :7].tolist() == list(range(10, 17)) and out.answer_length.tolist() == [7]
    assert out.gen_lengths.tolist() == [17] and out.nfe.tolist() == [7] and model.calls == 7
    assert out.tokens[0, 7:].tolist() == [EOS, MASK, 16, MASK, MASK, MASK, MASK, MASK, EOS, EOS]

    full = generate(Script([ROW_A]), torch.tensor([[1, 2, 3]]), None, daedal(**SETTINGS), GenerationConfig(None, 4),
                    stop_token_ids=NEVER)
    assert full.tokens[0].tolist() == list(range(10, 17)) + [EOS, EOS, 16] + [EOS] * 7
    assert full.decoded_at[0].tolist() == [3, 3, 3, 3, 4, 5, 5, 6, 7, 4, 8, 9, 10, 11, 12, -1, -1]
    assert full.nfe.tolist() == [13] and full.committed.tolist() == [15]


def test_stage1_stops_at_max_gen_length_without_a_tail():
    model = Script([dict(want=100)])  # never predicts EOS
    out = generate(model, torch.tensor([[1, 2, 3]]), None, daedal(**{**SETTINGS, "max_gen_length": 10}),
                   GenerationConfig(None, 4), stop_token_ids=NEVER)
    # sizing passes at 4 and 8 columns grow the row (8, then 10: capped); at 10 it is sized, with no room left
    # for the tail; then blocks of 4, 4 and 2 columns, all at 0.95, take one step each
    assert out.gen_lengths.tolist() == [10] and out.tokens[0].tolist() == list(range(10, 20))
    assert out.nfe.tolist() == [3 + 3]


@pytest.mark.parametrize("stops,nfe", [(NEVER, [13, 8]), (torch.tensor([EOS]), [7, 4])])
def test_batch_rows_grow_independently_and_equal_each_row_alone(stops, nfe):
    prompts = torch.tensor([[1, 2, 3], [0, 0, 4]])
    prompt_mask = torch.tensor([[True, True, True], [False, False, True]])
    batch = generate(Script([ROW_A, ROW_B]), prompts, prompt_mask, daedal(**SETTINGS), GenerationConfig(None, 4),
                     stop_token_ids=stops)
    assert batch.gen_lengths.tolist() == [17, 10] and batch.nfe.tolist() == nfe
    assert batch.answer_length.tolist() == ([17, 10] if stops is NEVER else [7, 3])
    for i, (spec, prompt) in enumerate([(ROW_A, [[1, 2, 3]]), (ROW_B, [[4]])]):
        alone = generate(Script([spec]), torch.tensor(prompt), None, daedal(**SETTINGS), GenerationConfig(None, 4),
                         stop_token_ids=stops)
        n = alone.gen_lengths[0]
        assert alone.tokens[0, :n].tolist() == batch.tokens[i, :n].tolist()
        assert (batch.tokens[i, n:] == EOS).all()  # the pad of a shorter row
        assert alone.nfe[0] == batch.nfe[i] and alone.gen_lengths[0] == batch.gen_lengths[i]
    assert batch.tokens[1, :3].tolist() == [10, 11, 12]


# --- the tiny checkpoints --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tiny_batch_equals_each_prompt_alone(request, family):
    """Rows of a left-padded batch grow to different lengths and get exactly what they get alone."""
    from transformers import AutoTokenizer

    from lmeval_dllm.models import load_model

    ck = request.getfixturevalue(f"{family}_dir")
    model, tok = load_model(ck), AutoTokenizer.from_pretrained(ck)
    prompts = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]
    enc, ids, mask = left_pad(tok, prompts)
    # A random model's confidences sit near 1/vocab, so which low-confidence threshold makes the rows grow
    # differently depends on the checkpoint's draw: take the first of a grid that does.
    for low in (0.02, 0.025, 0.027, 0.03, 0.032, 0.035, 0.04):
        kw = dict(initial_gen_length=8, max_gen_length=24, num_check_last_eot=4, expansion_factor=4,
                  initial_eot_expand_thres=0.0, decode_eot_expand_thres=1.0, low_conf_expand_thres=low,
                  threshold=0.05)
        sampler = daedal(eos=tok.eos_token_id, **kw)
        batch = generate(model, ids, mask, sampler, GenerationConfig(None, 8), stop_token_ids=NEVER)
        if len(set(batch.gen_lengths.tolist())) > 1:
            break
    assert len(set(batch.gen_lengths.tolist())) > 1, "rows must grow differently for the test to mean something"
    for i, e in enumerate(enc):
        alone = generate(model, torch.tensor([e]), None, sampler, GenerationConfig(None, 8), stop_token_ids=NEVER)
        n = alone.gen_lengths[0]
        assert alone.tokens[0, :n].tolist() == batch.tokens[i, :n].tolist(), f"row {i} ({prompts[i]!r})"
        assert alone.nfe[0] == batch.nfe[i] and n == batch.gen_lengths[i]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_refreshed_every_step_give_the_no_cache_decode(request, cache):
    """Growing rows go through prefix / dual caches (they notice the new length); refreshed at every step they
    are exact, insertions included."""
    from transformers import AutoTokenizer

    from lmeval_dllm.caches import build_cache
    from lmeval_dllm.models import load_model

    ck = request.getfixturevalue("llada_dir")
    model, tok = load_model(ck), AutoTokenizer.from_pretrained(ck)
    enc, ids, mask = left_pad(tok, ["What is 12+30?", "A longer prompt, with punctuation!"])
    kw = dict(initial_gen_length=8, max_gen_length=40, num_check_last_eot=4, expansion_factor=4,
              initial_eot_expand_thres=0.0, decode_eot_expand_thres=1.0, low_conf_expand_thres=0.03, threshold=0.05)
    exact = generate(model, ids, mask, daedal(eos=tok.eos_token_id, **kw), GenerationConfig(None, 8),
                     stop_token_ids=NEVER)
    assert exact.gen_lengths.tolist() == [40, 16]  # both rows insert masks while decoding
    cached = generate(model, ids, mask, daedal(eos=tok.eos_token_id, **kw), GenerationConfig(None, 8),
                      stop_token_ids=NEVER, cache=build_cache(cache, refresh_interval=1))
    assert cached.tokens.tolist() == exact.tokens.tolist() and cached.nfe.tolist() == exact.nfe.tolist()
    approx = generate(model, ids, mask, daedal(eos=tok.eos_token_id, **kw), GenerationConfig(None, 8),
                      stop_token_ids=NEVER, cache=build_cache(cache))
    n = approx.gen_lengths
    assert all((approx.tokens[i, :n[i]] != model.mask_token_id).all() for i in range(2))
    if cache == "dual":
        # Not compared: when any row grows, the dual cache starts over for the whole batch (its cached suffix keys
        # sit at shifted positions), so a row gets full recomputes it would not get alone.
        return
    for i, e in enumerate(enc):  # approximate, yet each row is exactly what its prompt gets alone through it
        alone = generate(model, torch.tensor([e]), None, daedal(eos=tok.eos_token_id, **kw), GenerationConfig(None, 8),
                         stop_token_ids=NEVER, cache=build_cache(cache))
        assert alone.gen_lengths[0] == n[i] and alone.nfe[0] == approx.nfe[i], f"row {i}"
        assert alone.tokens[0, :n[i]].tolist() == approx.tokens[i, :n[i]].tolist(), f"row {i}"


@pytest.mark.parametrize("cache", ["dllm", "d2cache"])
def test_caches_that_cannot_follow_a_growing_canvas_are_refused(cache):
    from lmeval_dllm.caches import build_cache

    with pytest.raises(ValueError, match=f"strategy 'daedal' cannot be used with cache='{cache}': the strategy "
                                         "changes the canvas length while decoding"):
        generate(Script([ROW_B]), torch.tensor([[1, 2]]), None, daedal(**SETTINGS), GenerationConfig(None, 4),
                 stop_token_ids=NEVER, cache=build_cache(cache))


# --- the lm_eval command line ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_cli_on_tiny_llada_at_batch_sizes_3_and_1(tmp_path, llada_dir):
    """The real command line: a batch of three prompts and a batch of one in one run (tests/cli_run.py). The
    tasks' gen_length / max_gen_toks (8) do not apply: each answer's length is DAEDAL's."""
    from cli_run import run_lm_eval

    results, samples, stats = run_lm_eval(
        tmp_path, f"pretrained={llada_dir},strategy=daedal,initial_gen_length=8,max_gen_length=16,"
                  "num_check_last_eot=4,expansion_factor=4,block_length=8,threshold=0.0")
    assert results["n-samples"] == {"smoke_three": {"original": 5, "effective": 3},
                                    "smoke_one": {"original": 1, "effective": 1}}
    assert results["config"]["dllm_strategy"] == "daedal"
    assert results["config"]["dllm_stats"]["requests"] == 4 and results["config"]["dllm_stats"]["batches"] == 2
    assert len(samples["smoke_three"]) == 3 and len(samples["smoke_one"]) == 1
    assert sorted(r["batch_size"] for r in stats) == [1, 3, 3, 3]
    # the random tiny model never expects EOS: every row grows 8 -> 12 -> 16 (the cap: no EOS tail) in three
    # passes; threshold 0 then commits each block of 8 in one step
    assert [r["gen_length"] for r in stats] == [16] * 4 and [r["nfe"] for r in stats] == [5] * 4
