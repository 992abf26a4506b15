"""PCSampler (lmeval_dllm/samplers/pc_sampler.py): calibrated, position-weighted scores on hand-built logits, the
published frequency tables, errors, and batching on the tiny checkpoints."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from batches import left_pad
from samplers_support import MASK, SHARED_DATA, peaked, state_with

from lmeval_dllm.samplers import Proposal, build_sampler

# f(3) = 0.5 (frequent), f(5) = 0.1, f(other) = 1 / N = 0.001 (unlisted tokens get the background value)
TABLE = {"num_token": 1000, "p_baseline_dict": {"3": 500, "5": 100}}
TOKENS = [3, 4, 5, 6]
CONF = [0.9, 0.5, 0.3, 0.6]


@pytest.fixture
def table(tmp_path) -> str:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(TABLE))
    return str(path)


def expected_scores(lambd, alpha, conf=CONF, tokens=TOKENS):
    freq = {3: 0.5, 5: 0.1}
    return [math.exp(-lambd * i) * min(-c * math.log(freq.get(t, 0.001) + 1e-9), alpha)
            for i, (c, t) in enumerate(zip(conf, tokens))]


def step(table, rows=([MASK] * 4,), block=None, **kw):
    sampler = build_sampler("pc_sampler", Proposal.from_params(), **{"frequency_table": table, **kw})
    state = state_with(rows, block=block)
    L = state.block.stop - state.block.start
    logits = peaked(CONF[:L], TOKENS[:L])
    scores = sampler.scores(logits, sampler.proposal(logits), state)
    return sampler.step(logits, state).commit[0].tolist(), scores[0].tolist()


@pytest.mark.parametrize("lambd,alpha", [(0.0, 10.0), (0.25, 10.0), (1.0, 10.0), (0.0, 2.0), (0.25, 0.5)])
def test_score_is_weight_times_clipped_calibrated_confidence(table, lambd, alpha):
    _, scores = step(table, lambd=lambd, clip_alpha=alpha)
    assert scores == pytest.approx(expected_scores(lambd, alpha), rel=1e-5)


def test_calibration_and_position_weight_choose_different_tokens(table):
    # plain confidence picks position 0 (p = 0.9, but its token has frequency 0.5)
    assert step(table, debias=False, frequency_table=None, lambd=0.0)[0] == [True, False, False, False]
    # calibrated: 0.6 * -log(0.001) = 4.14 at position 3 beats 0.5 * -log(0.001) = 3.45 at position 1
    assert step(table, lambd=0.0)[0] == [False, False, False, True]
    # with lambd = 0.25 position 3 weighs exp(-0.75): 1.96 < 3.45 * exp(-0.25) = 2.69
    assert step(table, lambd=0.25)[0] == [False, True, False, False]
    # clipped at 2.0, positions 1 and 3 tie: the lower position wins
    assert step(table, lambd=0.0, clip_alpha=2.0)[0] == [False, True, False, False]


def test_position_is_the_offset_inside_the_current_block(table):
    """PC-Sampler's release weights positions by torch.arange(block_length): the second block starts at i = 0."""
    rows = ([7, 7, 7, 7] + [MASK] * 4,)
    _, second = step(table, rows=rows, block=(4, 8), lambd=0.25)
    _, first = step(table, lambd=0.25)
    assert second == pytest.approx(first, rel=1e-6)


def test_threshold_on_the_score_and_num_transfer_tokens(table):
    # scores (lambd 0): [0.62, 3.45, 0.69, 4.14]
    assert step(table, lambd=0.0, threshold=3.0)[0] == [False, True, False, True]
    assert step(table, lambd=0.0, threshold=9.0)[0] == [False, False, False, True]  # at least one
    assert step(table, lambd=0.0, num_transfer_tokens=3)[0] == [False, True, True, True]


def test_table_is_uploaded_once(table):
    sampler = build_sampler("pc_sampler", Proposal.from_params(), frequency_table=table)
    first = sampler.neg_log_freq(10, torch.device("cpu"))
    assert sampler.neg_log_freq(10, torch.device("cpu")) is first and first.dtype == torch.float32
    assert first[3].item() == pytest.approx(-math.log(0.5 + 1e-9), rel=1e-6)


@pytest.mark.parametrize("kw,msg", [
    ({}, r"debias=true needs a token-frequency table: pass frequency_table=llada or frequency_table=dream"),
    ({"debias": False, "frequency_table": "x.json"}, "frequency_table='x.json' is only used with debias=true"),
    ({"frequency_table": "/no/such/table.json"}, r"frequency_table='/no/such/table.json': no such file\. To get"),
    ({"debias": False, "lambd": -0.1}, "lambd must be a finite number >= 0"),
    ({"debias": False, "clip_alpha": 0.0}, "clip_alpha must be a finite number > 0"),
    ({"debias": False, "threshold": 1.5}, r"threshold must be in \[0, 1\] for pc_sampler"),
    ({"debias": False, "factor": 1.0}, "unknown parameter 'factor' for strategy 'pc_sampler'"),
    ({"debias": False, "lambda": 0.3}, "unknown parameter 'lambda'.*did you mean 'lambd'"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_sampler("pc_sampler", Proposal.from_params(), **kw)


def test_threshold_range_follows_clip_alpha(table):
    build_sampler("pc_sampler", Proposal.from_params(), frequency_table=table, threshold=5.0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 2\] for pc_sampler"):
        build_sampler("pc_sampler", Proposal.from_params(), frequency_table=table, clip_alpha=2.0, threshold=5.0)


def test_entropy_confidence_is_rejected():
    with pytest.raises(ValueError, match="alg=entropy gives negative scores"):
        build_sampler("pc_sampler", Proposal.from_params(alg="entropy"), debias=False)


def test_table_from_another_tokenizer_is_an_error(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"num_token": 10, "p_baseline_dict": {"50": 10}}))
    sampler = build_sampler("pc_sampler", Proposal.from_params(), frequency_table=str(path))
    with pytest.raises(ValueError, match="lists token id 50 but the model's vocabulary has 10 entries"):
        sampler.step(peaked(CONF, TOKENS), state_with([[MASK] * 4]))


# --- PC-Sampler's published tables (../shared/data/pc_sampler), when present ----------------------------------

PUBLISHED = {  # family: (vocabulary of the model's logits, corpus size N, distinct ids, a frequent and a rare id)
    "llada": (126464, 1677991882, 83769, 198, 5815),
    "dream": (152064, 37641195, 39621, 74, 1021),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_published_table(family):
    path = os.path.join(SHARED_DATA, "pc_sampler", f"reference_corpus_{family}.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not here (PC-Sampler's published table)")
    vocab, n_tokens, n_ids, frequent, rare = PUBLISHED[family]
    with open(path, encoding="utf-8") as f:
        counts = json.load(f)["p_baseline_dict"]
    sampler = build_sampler("pc_sampler", Proposal.from_params(), frequency_table=path, lambd=0.0)
    assert sampler.table.num_tokens == n_tokens and sampler.table.token_ids.numel() == n_ids

    # a confident frequent token against a less confident rare one: the rare one wins
    logits = torch.full((1, 2, vocab), -30.0)
    logits[0, 0, frequent], logits[0, 0, frequent + 1] = 10.0, 6.0  # p = 0.98
    logits[0, 1, rare], logits[0, 1, rare + 1] = 9.0, 8.0  # p = 0.73
    state = state_with([[MASK, MASK]])
    proposed = sampler.proposal(logits)
    conf = proposed.confidence[0].tolist()
    f_frequent, f_rare = counts[str(frequent)] / n_tokens, counts[str(rare)] / n_tokens
    want = [min(-conf[0] * math.log(f_frequent + 1e-9), 10.0), min(-conf[1] * math.log(f_rare + 1e-9), 10.0)]
    assert sampler.scores(logits, proposed, state)[0].tolist() == pytest.approx(want, rel=1e-5)
    assert conf[0] > conf[1] and want[1] > want[0]
    assert sampler.step(logits, state).commit.tolist() == [[False, True]]


# --- tiny checkpoints --------------------------------------------------------------------------------------------


def test_batch_equals_each_prompt_alone(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from lmeval_dllm.generate import GenerationConfig, generate
    from lmeval_dllm.models import load_model
    from lmeval_dllm.samplers.frequency_table import build_frequency_table

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    path = tmp_path / "tiny_table.json"
    path.write_text(json.dumps(build_frequency_table(tok, ["the cat sat on the mat.\n"] * 3 + ["Zebra!"]).to_json()))
    model = load_model(tiny_dir)
    prompts, ids, mask = left_pad(tok, ["What is 12+30?", "Hi", "A longer prompt!"])
    sampler = build_sampler("pc_sampler", Proposal.from_params(), frequency_table=str(path), sigma=4.0)
    cfg, stops = GenerationConfig(16, 8), torch.tensor([tok.eos_token_id])
    batch = generate(model, ids, mask, sampler, cfg, stop_token_ids=stops)
    for i, e in enumerate(prompts):
        alone = generate(model, torch.tensor([e]), None, sampler, cfg, stop_token_ids=stops)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist() and alone.nfe[0] == batch.nfe[i], f"row {i}"
