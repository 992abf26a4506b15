"""Block-causal attention of one decode step, per SDPA backend (GPU): what a layer's attention costs when a
block-diffusion model runs a block (and the row left of it) against every key slot of the canvas.

    python benchmarks/bench_attention.py [--out bench_attention.json]

Shapes (bf16): Fast-dLLM v2 7B (28 query / 4 KV heads), SDAR-8B (32 / 8), head dim 128; keys = a 256 + 256 canvas
(+1 for Fast-dLLM v2's column after the last block); the block at generation block 2. For each: the mask the model
builds (``transformer.block_causal``) with PyTorch's choice, then each backend forced; and, for reference, the
same queries over only their visible keys with no mask (what a sliced-key kernel would cost); and the model's own
call on a GPU, flash attention's variable-length kernel over each block's visible keys (``models/flash.py``).
Prints a table of GPU microseconds per call (50 calls in one CUDA graph, median of 5 replays).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmeval_dllm.models.flash import block_causal_flash, block_runs
from lmeval_dllm.models.transformer import block_causal

SHAPES = {  # name: (query heads, kv heads, block size, rows run, keys)
    "fast-dllm-v2-7b block 32 (+ row left)": (28, 4, 32, 33, 513),
    "fast-dllm-v2-7b block 32": (28, 4, 32, 32, 513),
    "sdar-8b block 4 (two blocks)": (32, 8, 4, 8, 512),
    "sdar-8b block 4": (32, 8, 4, 4, 512),
}
BACKENDS = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "math": SDPBackend.MATH}


def timed(fn, calls: int = 50, runs: int = 5) -> float:
    """GPU microseconds per call: ``calls`` calls captured in one CUDA graph, replayed (no launch overhead, as in
    the decode loop's graphs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_attention.json")
    args = ap.parse_args()
    dev, rows = torch.device("cuda"), []
    for name, (H, Hkv, bs, Q, T) in SHAPES.items():
        start = 256 + 2 * bs  # the block decoded: generation block 2
        q0 = start - (Q - bs)  # the row left of the block when Q > bs (and the block before it for SDAR's 2 blocks)
        cols = torch.arange(q0, q0 + Q, device=dev)[None]
        mask = block_causal(cols, T, bs, None)  # (1, 1, Q, T)
        q = torch.randn(1, H, Q, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, T, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        visible = start + bs
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        for backend, b in BACKENDS.items():
            def call():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            try:
                if b is None:
                    us, err = timed(call), 0.0
                else:
                    with sdpa_kernel([b]):
                        us, err = timed(call), (call() - ref).abs().max().item()
            except RuntimeError as e:
                us, err = float("nan"), str(e).splitlines()[0][:80]
            rows.append(dict(shape=name, backend=backend, mask="block-causal", keys=T, us=us, max_abs_diff=err))
        runs = block_runs(cols, 1, T, bs, None)  # once per forward in the model; the layers share it
        want = ref.transpose(1, 2).reshape(1, Q, -1)

        def call():
            return block_causal_flash(q, k, v, runs)
        rows.append(dict(shape=name, backend="flash varlen (models/flash.py)", mask="block runs", keys=T,
                         us=timed(call), max_abs_diff=(call() - want).abs().max().item()))
        kv = k[:, :, :visible], v[:, :, :visible]
        for backend in ("auto", "flash"):
            def call():
                return F.scaled_dot_product_attention(q, *kv, enable_gqa=True)
            if backend == "auto":
                us = timed(call)
            else:
                with sdpa_kernel([BACKENDS[backend]]):
                    us = timed(call)
            rows.append(dict(shape=name, backend=backend, mask="none (visible keys only)", keys=visible, us=us,
                             max_abs_diff=None))
    print("| shape | backend | mask | keys | us per call | max abs diff to auto |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r["max_abs_diff"]
        d = "" if d is None else (f"{d:.2e}" if isinstance(d, float) else d)
        print(f"| {r['shape']} | {r['backend']} | {r['mask']} | {r['keys']} | {r['us']:.1f} | {d} |")
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
