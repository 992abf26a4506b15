"""models/flash.py: the runs cut for flash attention reproduce the block-causal mask exactly (CPU), and the flash
call equals masked SDPA, under CUDA graphs too (GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmeval_dllm.generate import block_aligned_canvas
from lmeval_dllm.models.flash import block_causal_flash, block_runs, flash_supported
from lmeval_dllm.models.transformer import block_causal


def expand(runs, B: int, Q: int, T: int) -> torch.Tensor:
    """The (B, Q, T) bool mask the runs attend with: run n's rows see slots [key_start, key_start + key_count)."""
    G = runs.key_start.shape[1]
    out = torch.zeros(B, Q, T, dtype=torch.bool)
    cu = runs.cu_q.tolist()
    for n in range(B * G):
        b, g = divmod(n, G)
        lo, count = int(runs.key_start[b, g]), int(runs.key_count[n])
        for r in range(cu[n], cu[n + 1]):
            assert r // Q == b, "a run's rows belong to one row of the batch"
            out[b, r % Q, lo:lo + count] = True
    return out


def canvas(lengths, gen: int, bs: int, greedy: bool = False):
    P = max(lengths)
    ids = torch.arange(P)[None].repeat(len(lengths), 1)
    mask = torch.arange(P)[None] >= (P - torch.tensor(lengths))[:, None]
    x, window, *_ = block_aligned_canvas(ids, mask, gen, bs, 99, 98, greedy_block_start=greedy)
    return x.shape[1], window


@pytest.mark.parametrize("lengths,gen,bs,greedy", [
    ([5], 16, 4, False), ([5, 12, 20], 24, 8, False), ([8, 3], 16, 8, True), ([32, 7, 40], 64, 32, True),
    ([1, 9], 8, 4, False)])
def test_runs_are_the_block_causal_mask_of_every_real_query(lengths, gen, bs, greedy):
    T, window = canvas(lengths, gen, bs, greedy)
    B = len(lengths)
    spans = [(0, T), (max(0, T - gen - 1), T), (bs - 1, 2 * bs), (T - 1, T), (3, 3 + bs), (0, 1)]
    for q0, q1 in spans:
        cols = torch.arange(q0, q1)[None]
        runs = block_runs(cols, B, T, bs, window)
        got = expand(runs, B, q1 - q0, T)
        want = block_causal(cols, T, bs, window[:, None, None, :])[:, 0]  # (B, Q, T)
        real = window[:, q0:q1]  # (B, Q) queries inside their row's window
        assert torch.equal(got[real], want[real]), (q0, q1)
        # a query outside the window attends to real keys only, at least one
        assert (got.sum(-1) >= 1).all()
        assert not (got & ~window[:, None, :]).any()
        assert runs.max_q == max(2, min(q1 - q0, bs))


def test_runs_without_a_mask_and_per_row_columns():
    bs, T = 4, 22
    cols = torch.stack([torch.arange(5, 14), torch.arange(8, 17)])  # (B, Q): each row its own span
    runs = block_runs(cols, 2, T, bs, None)
    assert torch.equal(expand(runs, 2, 9, T), block_causal(cols, T, bs, None)[:, 0])
    assert runs.cu_q.tolist() == [0, 3, 7, 9, 9, 13, 17, 18, 18]  # row 0: blocks 1, 2, 3; row 1: blocks 2, 3, 4, none
    assert runs.key_count.tolist() == [8, 12, 16, 1, 12, 16, 20, 1]  # an empty run: 1 (never read)
    cols = torch.arange(20, 22)[None]  # the last block (20..23) reaches past the slots: it sees them all
    assert torch.equal(expand(block_runs(cols, 1, T, bs, None), 1, 2, T), torch.ones(1, 2, T, dtype=torch.bool))


def test_flash_is_not_taken_where_it_cannot_run():
    q = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)
    assert not flash_supported(q, q)  # the CPU
    if torch.cuda.is_available():
        assert not flash_supported(q.cuda().float(), q.cuda().float())  # float32
        q = torch.zeros(1, 2, 3, 12, dtype=torch.bfloat16, device="cuda")
        assert not flash_supported(q, q)  # head dim not a multiple of 8


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("Hq,Hkv,D,bs", [(28, 4, 128, 32), (32, 8, 128, 4), (4, 2, 32, 8), (4, 4, 64, 8)])
def test_flash_equals_masked_sdpa_in_and_out_of_cuda_graphs(Hq, Hkv, D, bs):
    dev, dt = torch.device("cuda"), torch.bfloat16
    lengths, gen = [7, 3 * bs, 2 * bs + 1], 4 * bs
    T, window = canvas(lengths, gen, bs, greedy=bs == 32)
    window = window.to(dev)
    B = len(lengths)
    torch.manual_seed(0)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dt)  # the caches' storage layout
    v = torch.randn_like(k)
    assert flash_supported(k, k)

    def reference(q, cols, mask):
        m = block_causal(cols, T, bs, None if mask is None else mask[:, None, None, :])
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    for mask in (window, None):
        for q0, q1 in [(0, T), (2 * bs - 1, 3 * bs), (3 * bs, 4 * bs), (T - 1, T)]:
            cols = torch.arange(q0, q1, device=dev)[None]
            q = torch.randn(B, Hq, q1 - q0, D, device=dev, dtype=dt)
            got = block_causal_flash(q, k, v, block_runs(cols, B, T, bs, mask))
            want = reference(q, cols, mask)
            real = torch.ones(B, q1 - q0, dtype=torch.bool, device=dev) if mask is None else mask[:, q0:q1]
            assert (got.float() - want)[real].abs().max().item() < 2e-2, (mask is None, q0, q1)
            assert torch.isfinite(got).all()
    # one graph, replayed at other blocks (the runs come from the columns tensor): equal to eager
    Q = bs + 1
    cols = torch.arange(bs - 1, 2 * bs, device=dev)[None]
    q = torch.randn(B, Hq, Q, D, device=dev, dtype=dt)
    graph = torch.cuda.CUDAGraph()
    block_causal_flash(q, k, v, block_runs(cols, B, T, bs, window))  # warm up
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = block_causal_flash(q, k, v, block_runs(cols, B, T, bs, window))
    for start in (bs - 1, 2 * bs - 1, 3 * bs - 1):
        cols.copy_(torch.arange(start, start + Q, device=dev)[None])
        graph.replay()
        assert torch.equal(out, block_causal_flash(q, k, v, block_runs(cols, B, T, bs, window))), start
