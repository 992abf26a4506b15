"""The block cache of block-diffusion models (lmeval_dllm/caches/block.py): the rows each step runs (the prefill
folded into the first step, the finished block's K/V written at the next block's first step, the block alone
otherwise), tokens and NFE equal to cache=none (the whole canvas every step under the same block-causal mask)
over strategies, thresholds and prompts ending anywhere inside a block, a batch equal to each prompt alone, and
what it refuses."""

from __future__ import annotations

import pytest
import torch
from batches import pad_left

from lmeval_dllm.caches import CACHES, build_cache, check_compatible
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.models import load_model
from lmeval_dllm.samplers import SAMPLERS, Proposal, build_sampler
from lmeval_dllm.tiny import write_checkpoint


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    return load_model(write_checkpoint(str(tmp_path_factory.mktemp("tiny-sdar")), "sdar", seed=4))


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def run(model, batch, cache, strategy="vanilla", gen_length=12, stops=(256, 258), block_length=4, **kw):
    ids, mask = pad_left(256, batch)
    sampler = build_sampler(strategy, Proposal.from_params(), **kw)
    cache = build_cache(cache, cuda_graphs=False) if isinstance(cache, str) else cache
    return generate(model, ids, mask, sampler, GenerationConfig(gen_length, block_length),
                    stop_token_ids=torch.tensor(stops), cache=cache)


def test_rows_run_each_step(sdar):
    cache = build_cache("block", cuda_graphs=False)
    runs = []
    update = cache.update
    cache.update = lambda i, pos, k, v: (runs.append(pos.tolist()) if i == 0 else None, update(i, pos, k, v))[1]
    # a 6-token prompt: block 0 is prompt, block 1 holds its 2-token tail; one token per step, no stop token
    out = run(sdar, prompts(6), cache, stops=(), gen_length=8, num_transfer_tokens=1)
    assert out.steps == 10 == len(runs)
    assert runs == [list(range(0, 8)),  # prefill + block 1 (2 masks): its first step
                    list(range(4, 8)),
                    list(range(4, 12)), *[list(range(8, 12))] * 3,  # block 2: block 1 rewritten at its first step
                    list(range(8, 16)), *[list(range(12, 16))] * 3]


def test_sub_blocks_rerun_their_whole_attention_block(sdar):
    cache = build_cache("block", cuda_graphs=False)
    runs = []
    update = cache.update
    cache.update = lambda i, pos, k, v: (runs.append(pos.tolist()) if i == 0 else None, update(i, pos, k, v))[1]
    # blocks of 2 inside the model's blocks of 4; a 4-token prompt: the first decoded attention block is 4..7
    out = run(sdar, prompts(4), cache, stops=(), gen_length=8, block_length=2, num_transfer_tokens=1)
    assert out.steps == 8 == len(runs)
    assert runs == [list(range(0, 8)), *[list(range(4, 8))] * 3,  # the prefill, then sub-blocks 4-5 and 6-7
                    list(range(4, 12)), *[list(range(8, 12))] * 3]  # block 4..7 rewritten entering 8..11


@pytest.mark.parametrize("strategy, kw", [("vanilla", {}), ("vanilla", {"threshold": 0.2}),
                                          ("vanilla", {"threshold": 0.6, "num_transfer_tokens": 2}),
                                          ("vanilla", {"steps": 6}), ("ar", {"num_transfer_tokens": 2}),
                                          ("eb_sampler", {}), ("pc_sampler", {"debias": False})])
def test_tokens_and_nfe_equal_no_cache(sdar, strategy, kw):
    batch = prompts(1, 3, 4, 6, 9, 13, seed=1)
    a, b = run(sdar, batch, "block", strategy, **kw), run(sdar, batch, "none", strategy, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe) and torch.equal(a.answer_length,
                                                                                         b.answer_length)


@pytest.mark.parametrize("kw", [{}, {"threshold": 0.3}])
def test_sub_blocks_equal_no_cache(sdar, kw):
    batch = prompts(1, 3, 4, 6, 9, seed=3)
    a, b = run(sdar, batch, "block", block_length=2, **kw), run(sdar, batch, "none", block_length=2, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe)
    for i, p in enumerate(batch):
        alone = run(sdar, [p], "block", block_length=2, **kw)
        n = int(alone.answer_length[0])
        assert int(a.answer_length[i]) == n and a.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist(), i


def test_batch_equals_each_prompt_alone(sdar):
    batch = prompts(2, 5, 8, 11, seed=2)
    out = run(sdar, batch, "block", threshold=0.3)
    for i, p in enumerate(batch):
        alone = run(sdar, [p], "block", threshold=0.3)
        n = int(alone.answer_length[0])
        assert int(out.answer_length[i]) == n and out.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist(), i
        assert int(out.nfe[i]) == int(alone.nfe[0]), i


def test_refuses_extra_rows_and_resizing():
    for name in ("wino", "daedal"):
        with pytest.raises(ValueError, match=rf"^strategy {name!r} cannot be used with cache='block'"):
            check_compatible(SAMPLERS[name], CACHES["block"])


def test_needs_a_block_causal_model(llada_dir):
    model = load_model(llada_dir)
    with pytest.raises(ValueError, match=r"^cache='block' serves block-causal \(block-diffusion\) models only"):
        run(model, [[1, 2, 3]], "block")


def test_a_shifted_model_reruns_the_row_left_of_each_block(tmp_path):
    """A block-causal model that reads column t from row t - 1 (Dream's shift; here SDAR's network with the
    shift): the step of a block also runs the last row of the block before it (its K/V are final, so rewriting
    them changes nothing); tokens and NFE equal no cache."""
    import dataclasses

    model = load_model(write_checkpoint(str(tmp_path / "sdar"), "sdar", seed=3))
    model.args = dataclasses.replace(model.args, logit_shift=1)
    cache = build_cache("block", cuda_graphs=False)
    runs = []
    update = cache.update
    cache.update = lambda i, pos, k, v: (runs.append(pos.tolist()) if i == 0 else None, update(i, pos, k, v))[1]
    batch = prompts(4, 8, 12, seed=5)  # whole blocks: the answer starts a block, column 0 is never a target
    a = run(model, batch, cache, stops=(), gen_length=8, num_transfer_tokens=1)
    b = run(model, batch, "none", stops=(), gen_length=8, num_transfer_tokens=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe) and a.steps == b.steps == 8
    assert runs == [list(range(0, 16)), *[list(range(11, 16))] * 3,  # prefill + block 12..15, then row 11 with it
                    list(range(12, 20)), *[list(range(15, 20))] * 3]  # block 12..15 rewritten entering 16..19


def test_the_greedy_block_start_stores_the_finished_block(tmp_path):
    """Fast-dLLM v2: the pass that stores a finished block's K/V (the prefill at the start) commits the next
    block's first column; each step then runs the row left of the block with it. One more pass commits the column
    after the last block. Tokens and NFE equal no cache."""
    model = load_model(write_checkpoint(str(tmp_path / "fdllm2"), "fast_dllm_v2", bd_size=4, seed=3))
    cache = build_cache("block", cuda_graphs=False)
    runs = []
    update = cache.update
    cache.update = lambda i, pos, k, v: (runs.append(pos.tolist()) if i == 0 else None, update(i, pos, k, v))[1]
    batch = prompts(4, 8, 12, seed=5)
    a = run(model, batch, cache, stops=(), gen_length=8, num_transfer_tokens=1)
    b = run(model, batch, "none", stops=(), gen_length=8, num_transfer_tokens=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe)
    assert a.steps == 9 and a.nfe.tolist() == [9, 9, 9]  # 3 masks per block after its greedy column, 3 store passes
    assert a.gen_lengths.tolist() == [9, 9, 9]  # 8 + the column after the last block
    assert runs == [list(range(0, 12)), *[list(range(11, 16))] * 3,  # prefill (commits column 12), block 12..15
                    list(range(12, 16)), *[list(range(15, 20))] * 3,  # store 12..15 (commits 16), block 16..19
                    list(range(16, 20))]  # store 16..19, committing column 20
