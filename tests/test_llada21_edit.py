"""strategy=llada21_edit (lmeval_dllm/samplers/llada21_edit.py, LLaDA2.1's token editing, arXiv:2602.08676): exact
M2T / T2T commits on hand-built logits (strict thresholds, the num_to_transfer floor, prompt columns never edited,
tokens never turned back into masks), the post-step rule through the decode loop on a scripted model (block done =
a mask-free pass with no edit, at most max_post_steps mask-free passes), a batch equal to each row alone, and the
named parameter errors before any model work. The release-decoder parity on the tiny LLaDA2 checkpoint is in
docs/strategies.md; decoding the real tiny checkpoint is in tests/test_llada2.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from samplers_support import MASK, peaked, state_with

from lmeval_dllm.decoding import resolve
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.samplers import Proposal, build_sampler

T, F = True, False


def sampler(**kw):
    return build_sampler("llada21_edit", Proposal.from_params(), **kw)


def step(rows, conf, tokens, decoded=None, **kw):
    """One step on a hand-built state: rows = the block (generation region, MASK = undecided), decoded = which
    non-mask columns this call committed (default: all of them; False = a prompt tail column)."""
    s = state_with(rows)
    s.decoded_at = torch.full(s.x.shape, -1)
    gen = s.x[:, s.prompt_len:]
    dec = torch.tensor(decoded) if decoded is not None else gen != MASK
    s.decoded_at[:, s.prompt_len:] = torch.where(dec & (gen != MASK), 0, -1)
    sm = sampler(**kw)
    sm.begin_block(s)
    sm.block_continues(s, (gen == MASK).any(-1))
    out = sm.step(peaked(conf, tokens), s)
    return out, s


def test_m2t_commits_every_mask_strictly_above_threshold():
    out, _ = step([[MASK, MASK, MASK, 5]], [0.96, 0.97, 0.5, 0.99], [3, 4, 6, 5])
    assert out.commit.tolist() == [[T, T, F, F]]  # column 3 is decoded: never an M2T commit
    assert out.tokens.tolist() == [[3, 4, 6, 5]]
    assert out.revise.tolist() == [[F, F, F, F]]  # column 3's proposal equals its token: no edit


def test_m2t_threshold_is_strict():
    # logits [0, 0, -inf ...] give exactly 0.5 to two tokens: threshold 0.5 does not pass them (the release's >)
    s = state_with([[MASK, MASK, MASK]])
    s.decoded_at = torch.full(s.x.shape, -1)
    logits = torch.full((1, 3, 10), float("-inf"))
    logits[0, :2, :2] = 0.0
    logits[0, 2, 3], logits[0, 2, 4] = 1.0, 0.0  # p = 0.731 on token 3
    sm = sampler(threshold=0.5)
    sm.begin_block(s)
    sm.block_continues(s, torch.tensor([True]))
    assert sm.step(logits, s).commit.tolist() == [[F, F, T]]
    # with every mask at exactly 0.5, none passes: the floor commits the single best (the lower column on a tie)
    logits[0, 2] = logits[0, 0]
    assert sm.step(logits, s).commit.tolist() == [[T, F, F]]


def test_m2t_floor_is_num_to_transfer_best():
    out, _ = step([[MASK, MASK, MASK, MASK]], [0.3, 0.6, 0.96, 0.5], [1, 1, 1, 1], num_to_transfer=3)
    assert out.commit.tolist() == [[F, T, T, T]]  # one above 0.95 < 3: the three most confident
    out, _ = step([[MASK, MASK, MASK, MASK]], [0.3, 0.6, 0.2, 0.5], [1, 1, 1, 1])
    assert out.commit.tolist() == [[F, T, F, F]]  # default 1


def test_t2t_edits_decoded_answer_columns_only():
    rows = [[4, 5, 6, 7, MASK]]
    conf = [0.99, 0.95, 0.91, 0.89, 0.2]
    tokens = [1, 2, 3, 7, 8]
    # column 0 is a prompt tail column (never committed by this call): never edited even at p = 0.99
    out, _ = step(rows, conf, tokens, decoded=[[F, T, T, T, F]])
    assert out.revise.tolist() == [[F, T, T, F, F]]  # 0.95, 0.91 > 0.9 and changed; 0.89 too low
    assert out.commit.tolist() == [[F, F, F, F, T]]  # the one mask, by the floor
    out, _ = step(rows, conf, tokens, decoded=[[F, T, T, T, F]], editing_threshold=0.0)
    assert out.revise.tolist() == [[F, T, T, F, F]]  # column 3's proposal is its own token: not an edit


class EditScript:
    """A stand-in DiffusionLM (bidirectional) whose proposal for each row depends only on that row's canvas:
    ``plan[row key]`` = [(generation tokens seen or None for "any with masks", proposed tokens, confidence)];
    the first entry matching the row's current generation region gives its logits. The row key is the row's
    last prompt token."""

    def __init__(self, plan, vocab=10):
        self.plan, self.vocab = plan, vocab
        self.args = SimpleNamespace(block_size=None, pad_token_id=0)
        self.block_size = None  # bidirectional (DiffusionLM.block_size)
        self.device, self.dtype, self.mask_token_id, self.logit_shift = torch.device("cpu"), torch.float32, MASK, 0
        self.calls = 0

    def predict(self, input_ids, position_ids, targets, *, attention_mask=None, cache=None, query_start=0):
        self.calls += 1
        G = len(next(iter(self.plan.values()))[0][1])
        P = input_ids.shape[1] - G
        rows = []
        for r in range(input_ids.shape[0]):
            gen = input_ids[r, P:].tolist()
            for seen, tokens, conf in self.plan[int(input_ids[r, P - 1])]:
                if seen == gen or (seen is None and MASK in gen):
                    rows.append(peaked([conf] * G, tokens, self.vocab)[0])
                    break
            else:
                raise AssertionError(f"no plan for {gen}")
        return torch.stack(rows)[:, targets.start - P:targets.stop - P]


A, B, C = [3, 4, 5, 6], [3, 4, 7, 6], [3, 4, 5, 6]
PLAN = {
    1: [(None, A, 0.99), (A, B, 0.95), (B, B, 0.95)],  # fill, one edit, then a pass with nothing to edit
    2: [(None, C, 0.99), (C, C, 0.99)],  # fill, then the editing pass finds nothing
    3: [(None, A, 0.5), (A, B, 0.95), (B, A, 0.95)],  # one mask per pass, then edits back and forth forever
}


def run(prompts, max_post_steps=16, plan=PLAN, **kw):
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[F] * (L - len(p)) + [T] * len(p) for p in prompts]) if len(prompts) > 1 else None
    model = EditScript(plan)
    out = generate(model, ids, mask, sampler(max_post_steps=max_post_steps, **kw), GenerationConfig(4, 4),
                   stop_token_ids=torch.tensor([8]))
    return out


def test_block_done_after_a_mask_free_pass_without_edit():
    out = run([[1]])
    assert out.tokens.tolist() == [B] and out.nfe.tolist() == [3]  # fill, edit, the check
    out = run([[2]])
    assert out.tokens.tolist() == [C] and out.nfe.tolist() == [2]  # after the last mask, always one more pass


def test_at_most_max_post_steps_mask_free_passes():
    assert run([[1]], max_post_steps=1).nfe.tolist() == [2]  # the editing pass, then the limit (edit kept)
    assert run([[1]], max_post_steps=1).tokens.tolist() == [B]
    assert run([[1]], max_post_steps=0).tokens.tolist() == [A]  # no pass after the block is filled
    assert run([[1]], max_post_steps=0).nfe.tolist() == [1]
    out = run([[3]], max_post_steps=5)  # 4 passes fill one mask each (p 0.5 < 0.95), then 5 edit passes
    assert out.nfe.tolist() == [4 + 5] and out.tokens.tolist() == [B]
    out = run([[3]])
    assert out.nfe.tolist() == [4 + 16] and out.tokens.tolist() == [A]


def test_batch_equals_each_row_alone():
    prompts = [[5, 1], [2], [6, 6, 3]]
    batch = run(prompts, max_post_steps=3)
    for i, p in enumerate(prompts):
        alone = run([p], max_post_steps=3)
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), i
        assert alone.nfe[0] == batch.nfe[i], i
    assert batch.nfe.tolist() == [3, 2, 4 + 3]


def test_other_strategies_keep_todays_block_rule():
    # vanilla on the same script: the block ends when it has no mask (one pass: every mask at 0.99 > 0.9)
    model = EditScript(PLAN)
    out = generate(model, torch.tensor([[1]]), None, build_sampler("vanilla", Proposal.from_params(), threshold=0.9),
                   GenerationConfig(4, 4), stop_token_ids=torch.tensor([8]))
    assert out.tokens.tolist() == [A] and out.nfe.tolist() == [1]


@pytest.mark.parametrize("kw,msg", [
    ({"threshold": 1.5}, r"threshold must be a probability in \[0, 1\], got 1.5"),
    ({"editing_threshold": -0.1}, r"editing_threshold must be a probability in \[0, 1\], got -0.1"),
    ({"max_post_steps": -1}, r"max_post_steps must be an integer >= 0 \(mask-free passes per block\), got -1"),
    ({"num_to_transfer": 0}, r"num_to_transfer must be an integer >= 1 .*got 0"),
    ({"remasking": "random"}, r"the confidence 'random' is not that probability"),
    ({"steps": 8}, r"unknown parameter 'steps' in --model_args for strategy 'llada21_edit'"),
])
def test_invalid_parameters_are_named_before_any_model_work(kw, msg):
    with pytest.raises(ValueError, match=msg):
        resolve("llada21_edit", None, kw)


def test_release_defaults():
    s = sampler()
    assert (s.threshold, s.editing_threshold, s.max_post_steps, s.num_to_transfer) == (0.95, 0.9, 16, 1)
    assert s.step_budget(32) == 32 + 16 + 1
