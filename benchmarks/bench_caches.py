"""Decode-step latency, throughput and memory of every cache, next to the GPU's floors.

    python benchmarks/bench_caches.py --out results.json            # on a GPU: LLaDA-8B and Dream-7B shapes
    python benchmarks/bench_caches.py --tiny --out /tmp/tiny.json   # on the CPU: tiny shapes, checks the script
    python benchmarks/bench_caches.py --strategy hierarchy ...       # another strategy at its defaults
    python benchmarks/bench_caches.py --models sdar-8b,llada2-mini --caches none,block --batches 1,64
                                                                     # block diffusion, in blocks of its own size

Models are built directly on the device with random bf16 weights in the shapes of LLaDA-8B (32 layers, d_model
4096, 32 heads, MLP 12288, vocab 126464) and Dream-7B (28 layers, hidden 3584, 28 / 4 KV heads, MLP 18944,
vocab 152064): no checkpoint is read. Each configuration decodes random prompts through the real
``lmeval_dllm.generate.generate`` loop with the ``vanilla`` strategy committing one token per step (so every cache
makes the same number of forward passes, NFE = tokens: tokens/s is NFE-normalised), blocks of 32.

Measured per configuration:

- step latency: CUDA events recorded at the start of every step (inside the loop, no extra sync); the median of the
  differences is the typical step (forward + sampler + loop bookkeeping); the mean includes the full-canvas steps
  at block starts and the first-use CUDA-graph captures;
- tokens/s: generated tokens of the batch / wall time of the ``generate`` call;
- peak memory: ``torch.cuda.max_memory_allocated`` during the call (weights included).

Floors, measured once on the same GPU: the weight-read floor (bytes of all weights / device-to-device copy
bandwidth, bytes read + written) bounds any step; the compute floor of a full forward (matmul FLOPs of the whole
canvas + attention + the LM head over the block / measured bf16 matmul rate) bounds the no-cache step.

Correctness of the fast path (CUDA graphs and fused kernels against the plain path, one cache object over
batches of other shapes, memory flat over many prompt lengths) is checked by ``tests/test_gpu.py``, which runs
wherever CUDA is available.

At batch 16 only the first ``--blocks-b16`` blocks are decoded (the no-cache step is ~20x slower there), so the
prefix cache's numbers at batch 16 come from its most expensive blocks (the longest suffix).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, after the script dir

from lmeval_dllm.caches import build_cache  # noqa: E402
from lmeval_dllm.caches.graphs import StepGraphs  # noqa: E402
from lmeval_dllm.generate import GenerationConfig, generate  # noqa: E402
from lmeval_dllm.models import DiffusionLM, ModelArgs  # noqa: E402
from lmeval_dllm.models.transformer import MoEArgs  # noqa: E402
from lmeval_dllm.models.kernels import fused_status  # noqa: E402
from lmeval_dllm.samplers import Proposal, build_sampler, sampler_class  # noqa: E402

SHAPES = {
    "llada-8b": dict(family="llada", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=12288,
                     vocab_size=126464, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False, rope_fp32=True,
                     tie_embeddings=False, max_position=4096, mask_token_id=126336, eos_token_id=126081,
                     pad_token_id=126081, logit_shift=0),
    "dream-7b": dict(family="dream", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
                     vocab_size=152064, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, rope_fp32=False,
                     tie_embeddings=False, max_position=131072, mask_token_id=151666, eos_token_id=151643,
                     pad_token_id=151643, logit_shift=1),
    # LLaDA-MoE-7B-A1B: 7.36B parameters, 16 layers, d_model 2048, 16 heads of 128 (no GQA), q/k RMSNorm, 64 SwiGLU
    # experts of 1024 per layer with top-8 softmax routing, no shared expert (public notes on inclusionAI's release);
    # vocab 157184 (what the 7.36B total leaves for the embedding and head); RoPE theta does not change the timing.
    "llada-moe-7b": dict(family="llada_moe", dim=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                         intermediate_size=8192, vocab_size=157184, rope_theta=50000.0, norm_eps=1e-5,
                         qkv_bias=False, rope_fp32=False, tie_embeddings=False, max_position=8192,
                         mask_token_id=156895, eos_token_id=156892, pad_token_id=156892, logit_shift=0,
                         qk_norm=True, moe=MoEArgs(num_experts=64, top_k=8, expert_intermediate_size=1024,
                                                   shared_intermediate_size=None, norm_topk_prob=False,
                                                   layers=(True,) * 16)),
    # Block diffusion (block-causal attention, decoded with cache=block, `--block` = the model's block size).
    # SDAR-8B-Chat: Qwen3-8B layers (36 x 4096, 32 / 8 KV heads of 128, q/k RMSNorm, MLP 12288, vocab 151936), block 4.
    "sdar-8b": dict(family="sdar", dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, intermediate_size=12288,
                    vocab_size=151936, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=False, rope_fp32=False,
                    tie_embeddings=False, max_position=32768, mask_token_id=151669, eos_token_id=151645,
                    pad_token_id=151643, logit_shift=0, qk_norm=True, block_size=4),
    # LLaDA2.0-mini: 20 x 2048, 16 / 4 KV heads of 128, q/k norm, RoPE on half of each head, layer 0 dense (5120),
    # then 256 experts of 512, top 8 of 4 groups out of 8, sigmoid router with bias, one shared expert; block 32.
    "llada2-mini": dict(family="llada2", dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, intermediate_size=5120,
                        vocab_size=157184, rope_theta=600000.0, norm_eps=1e-6, qkv_bias=False, rope_fp32=False,
                        tie_embeddings=False, max_position=32768, mask_token_id=156895, eos_token_id=156892,
                        pad_token_id=156892, logit_shift=0, qk_norm=True, partial_rotary_factor=0.5,
                        block_size=32,
                        moe=MoEArgs(num_experts=256, top_k=8, expert_intermediate_size=512,
                                    shared_intermediate_size=512, norm_topk_prob=True,
                                    layers=(False,) + (True,) * 19, score_function="sigmoid", expert_bias=True,
                                    n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_eps=1e-20,
                                    weights_fp32=True, router_fp32=True)),
    # Fast-dLLM v2 7B: Qwen2.5-7B layers (28 x 3584, 28 / 4 KV heads of 128, q/k/v bias, MLP 18944, vocab 152064,
    # untied), the Dream token shift, block 32 (config.json bd_size), mask id 151665.
    "fast-dllm-v2-7b": dict(family="fast_dllm_v2", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                            intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0, norm_eps=1e-6,
                            qkv_bias=True, rope_fp32=False, tie_embeddings=False, max_position=32768,
                            mask_token_id=151665, eos_token_id=151645, pad_token_id=151643, logit_shift=1,
                            block_size=32),
    # --tiny: same code paths on the CPU in seconds
    "tiny-llada": dict(family="llada", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128,
                       vocab_size=512, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False, rope_fp32=True,
                       tie_embeddings=False, max_position=4096, mask_token_id=500, eos_token_id=501,
                       pad_token_id=501, logit_shift=0),
    "tiny-sdar": dict(family="sdar", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                      vocab_size=512, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=False, rope_fp32=False,
                      tie_embeddings=False, max_position=4096, mask_token_id=500, eos_token_id=501,
                      pad_token_id=501, logit_shift=0, qk_norm=True, block_size=4),
    "tiny-dream": dict(family="dream", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                       vocab_size=512, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, rope_fp32=False,
                       tie_embeddings=False, max_position=4096, mask_token_id=500, eos_token_id=501,
                       pad_token_id=501, logit_shift=1),
    "tiny-fast-dllm-v2": dict(family="fast_dllm_v2", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=128, vocab_size=512, rope_theta=1000000.0, norm_eps=1e-6,
                              qkv_bias=True, rope_fp32=False, tie_embeddings=False, max_position=4096,
                              mask_token_id=500, eos_token_id=501, pad_token_id=501, logit_shift=1, block_size=32),
}
CACHE_KW = {"none": {}, "prefix": {}, "dual": {}, "dllm": {}, "d2cache": {},  # each cache at its defaults
            # dInfer's vicinity refresh at 16 / 16 columns around the block, 4 warm-up passes (its defaults are 0,
            # which is the dual cache)
            "vicinity": {"prefix_look": 16, "after_look": 16, "warmup_steps": 4},
            # Sparse-dLLM at its scripts' and configs' setting (also its defaults)
            "sparse": {"keep_ratio": 0.5, "kernel_size": 3},
            "elastic": {},  # Elastic-Cache at the release's defaults (window 16, gamma 0.9, one tracked per layer)
            "block": {},  # block diffusion's exact cache (no parameters)
            "dkv": {}}  # dKV-Cache-Decode, cache_reloading_step=8 (the release's LLaDA README setting)
# label -> (cache, parameters): settings timed beside the defaults. Elastic-Cache's drift test on random weights
# (near-uniform attention) fires at most steps, so its default rows time refreshes; gamma=0 never drifts, which
# times its cached step alone (the cost a trained model pays between refreshes).
CACHE_VARIANTS = {"elastic_gamma0": ("elastic", {"gamma": 0.0})}


def build_model(name: str, device: torch.device, dtype: torch.dtype, fuse: bool = True) -> DiffusionLM:
    """Random weights of the given shape, created on ``device`` (never materialised in float32)."""
    args = ModelArgs(**SHAPES[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DiffusionLM(args, fuse=fuse)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 and "tok_emb" not in pname else 1.0,
                          generator=g)
        # Random logits never favour the mask token (a real model never proposes it; a proposal of [MASK]
        # would leave the position undecided).
        model.output.weight[args.mask_token_id].zero_()
    model.init_buffers(device)
    return model.eval().requires_grad_(False)


def weight_bytes(model: DiffusionLM, active: bool = False) -> int:
    """Bytes of all weights; ``active``: of the weights one token uses (a mixture of experts counts top_k of its
    num_experts experts), the floor the issue asks MoE steps to be measured against."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    moe = model.args.moe
    if not active or moe is None:
        return total
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if n.endswith(("moe.w13", "moe.w2")))
    return total - round(experts * (1 - moe.top_k / moe.num_experts))


def forward_flops(a: ModelArgs, B: int, rows: int, keys: int, head_rows: int) -> float:
    """Matmul FLOPs of running ``rows`` rows per sequence against ``keys`` keys, LM head on ``head_rows``."""
    hd = a.dim // a.n_heads
    per_row = 2 * a.dim * (a.n_heads * hd + 2 * a.n_kv_heads * hd)  # q, k, v
    per_row += 2 * a.n_heads * hd * a.dim  # output projection
    inter = a.intermediate_size if a.moe is None else a.moe.top_k * a.moe.expert_intermediate_size + \
        (a.moe.shared_intermediate_size or 0)  # a token's experts (and the shared one)
    per_row += 2 * a.dim * 2 * inter + 2 * inter * a.dim  # SwiGLU
    attention = 4 * rows * keys * a.n_heads * hd  # QK^T and PV
    return B * (a.n_layers * (rows * per_row + attention) + 2 * head_rows * a.dim * a.vocab_size)


def measure_floors(device: torch.device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, medians of 10 runs."""
    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return statistics.median(times)

    def copy_time(n):
        src = torch.randn(n, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src))

    def matmul_time(m):
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        return timed(lambda: a @ b)

    n, m = 1 << 30, 8192  # 2 GiB of bf16 each way, far beyond L2; random operands (zeros run faster)
    copy_s, mm_s = copy_time(n), matmul_time(m)
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * n * 2 / copy_s, "matmul_flops_per_s": 2 * m ** 3 / mm_s}


def run_config(model: DiffusionLM, cache_name: str, B: int, P: int, G: int, block: int, blocks: int,
               device: torch.device, use_graphs: bool = True, strategy: str = "vanilla") -> dict:
    a = model.args
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, a.mask_token_id, (B, P), generator=gen)
    registry_name, kw = CACHE_VARIANTS.get(cache_name, (cache_name, CACHE_KW.get(cache_name, {})))
    cache = build_cache(registry_name, cuda_graphs=use_graphs, **kw)
    # vanilla: one token per step (NFE = tokens); another strategy runs at its defaults (its step cost; on random
    # weights its tokens per step mean nothing)
    sampler = (build_sampler("vanilla", Proposal.from_params(), num_transfer_tokens=1) if strategy == "vanilla"
               else build_sampler(strategy, Proposal.from_params()))
    events: list = []
    inner = cache.forward

    def forward(*args, **kwargs):  # one event at the start of every step: no sync, read after the call
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append(e)
        else:
            events.append(time.perf_counter())
        return inner(*args, **kwargs)

    cache.forward = forward
    done = {"blocks": 0}

    def stop_after(gen_tokens, finished):  # decode only the first `blocks` blocks
        done["blocks"] += 1
        return torch.full_like(finished, done["blocks"] >= blocks)

    config = GenerationConfig(gen_length=G, block_length=block)
    stops = torch.tensor([-1])  # random weights: never stop early
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = generate(model, prompt, None, sampler, config, stop_token_ids=stops, cache=cache, block_done=stop_after)
    if device.type == "cuda":
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        marks = events + [end]
        steps_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(events))]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        marks = events + [time.perf_counter()]
        steps_ms = [(marks[i + 1] - marks[i]) * 1e3 for i in range(len(events))]
        peak = 0
    committed = int(out.committed.sum())
    # every decoded block filled (a block-diffusion model's first block starts with the prompt's tail)
    tail = min(P % a.block_size, blocks * block) if a.block_size else 0
    assert committed == B * (blocks * block - tail), (committed, B, blocks, block, tail)
    cache.forward = inner
    forward = forward_alone_ms(cache) if use_graphs and device.type == "cuda" else {}
    # a cache's own step counts (elastic: steps that refreshed), where it keeps them
    counts = {k: getattr(cache, k) for k in ("refresh_steps", "refreshed_layers", "cached_steps") if hasattr(cache, k)}
    del cache
    return {
        "cache": cache_name, "strategy": strategy, "batch": B, "prompt": P, "gen": G, "block": block, "blocks_decoded": blocks,
        "steps": out.steps, "graphs": use_graphs,
        "median_step_ms": statistics.median(steps_ms), "mean_step_ms": sum(steps_ms) / len(steps_ms),
        "tokens_per_s": committed / wall, "wall_s": wall, "peak_mem_gib": peak / 2 ** 30, **counts, **forward,
    }


def forward_alone_ms(cache) -> dict:
    """The cache's most replayed step graph (its cached step's forward pass), replayed back to back after the
    call: {"forward_ms": GPU ms per replay, "forward_replays": how often the call replayed it}. The median step
    minus this is what the sampler, the decode loop and its one host read per step add."""
    graphs = [g for g in vars(cache).values() if isinstance(g, StepGraphs)]
    graph, count = max((g.most_replayed() for g in graphs), key=lambda gc_: gc_[1], default=(None, 0))
    if graph is None:
        return {}
    for _ in range(3):
        graph.replay()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(21)]
    for i in range(20):
        marks[i].record()
        graph.replay()
    marks[20].record()
    torch.cuda.synchronize()
    return {"forward_ms": statistics.median(marks[i].elapsed_time(marks[i + 1]) for i in range(20)),
            "forward_replays": count}


def profile_step(name: str, cache_name: str, device: torch.device, P: int = 256, G: int = 256,
                 block: int = 32) -> str:
    """GPU kernel time per step of one block decoded without CUDA graphs (where a step's device time goes)."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(name, device, torch.bfloat16)
    block = model.args.block_size or block  # a block-diffusion model decodes its own blocks
    run_config(model, cache_name, 1, P, G, block, 1, device, use_graphs=False)  # warm up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = run_config(model, cache_name, 1, P, G, block, 1, device, use_graphs=False)
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    head = (f"profile {name} {cache_name} B=1 {P}/{G}: {r['steps']} steps, {kernels / r['steps']:.0f} kernels/step, "
            f"{gpu_us / r['steps'] / 1e3:.2f} ms GPU time/step (median wall step {r['median_step_ms']:.2f} ms)")
    top = events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)
    del model
    return head + "\n" + top


def measure_shape(model, name, B, P, G, block, caches, eager, args, floors, save, device) -> list[dict]:
    """Every cache (and the eager variants at batch 1) on one model, batch size and length."""
    a, wbytes, rows = model.args, weight_bytes(model, active=True), []
    blocks = (args.blocks_b1 if B == 1 else args.blocks_b16) or G // block
    T = P + G
    if B == 1 and args.caches_b1:
        caches = args.caches_b1.split(",")
    runs = [(c, True) for c in caches] + [(c, False) for c in eager if B == 1 and c in caches and P == G == 256]
    for cache_name, graphs in runs:
        try:
            r = run_config(model, cache_name, B, P, G, block, blocks, device, graphs, args.strategy)
        except torch.cuda.OutOfMemoryError as e:  # report and go on with the next configuration
            print(f"OOM {name} B={B} {P}/{G} {cache_name}: {e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        # Rows a step of this cache must run at least (prefix: averaged over the decoded blocks).
        prefix_rows = sum(T - P - b * block for b in range(blocks)) / blocks
        vicinity = block + CACHE_KW["vicinity"]["prefix_look"] + CACHE_KW["vicinity"]["after_look"] + a.logit_shift
        rows_run = {"none": T, "prefix": prefix_rows, "dual": block + a.logit_shift,
                    "vicinity": vicinity, "sparse": block + a.logit_shift,
                    # dkv runs every mask and the last step's token: one token per step, the masks of the decoded
                    # blocks' steps average G - (blocks * block - 1) / 2 (half the generation when all are decoded)
                    "dkv": G - (blocks * block - 1) / 2 + 1 + a.logit_shift}.get(cache_name, block)
        if cache_name.startswith("elastic"):  # its slots at the defaults: one tracked per layer, 16 committed, 16 window
            rows_run = a.n_layers + 2 * 16
        # keys a cached step attends to (sparse: the kept share of the other columns plus the block's own)
        keys = int((T - block) * CACHE_KW["sparse"]["keep_ratio"]) + block + a.logit_shift \
            if cache_name == "sparse" else T
        r.update(model=name, weight_bytes=wbytes, all_weight_bytes=weight_bytes(model),
                 weight_floor_ms=wbytes / floors["copy_bytes_per_s"] * 1e3,
                 full_compute_floor_ms=forward_flops(a, B, T, T, block) / floors["matmul_flops_per_s"] * 1e3,
                 step_compute_floor_ms=forward_flops(a, B, rows_run, keys, block) / floors["matmul_flops_per_s"] * 1e3)
        rows.append(r)
        save(rows)
        print(json.dumps(r), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], floors: dict) -> str:
    lines = ["| model | B | prompt/gen | cache | median step ms | forward alone ms | mean step ms | tok/s | peak GiB | "
             "weight floor ms | full-forward compute floor ms | median / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wf, cf = r["weight_floor_ms"], r["full_compute_floor_ms"]
        ratio = r["median_step_ms"] / (cf if r["cache"] == "none" else max(wf, r["step_compute_floor_ms"]))
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']}/{r['gen']} | {r['cache']}"
                     f"{'' if r.get('strategy', 'vanilla') == 'vanilla' else ' / ' + r['strategy']}"
                     f"{'' if r['graphs'] else ' (eager)'} | {r['median_step_ms']:.2f} | "
                     f"{'' if 'forward_ms' not in r else format(r['forward_ms'], '.2f')} | {r['mean_step_ms']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['peak_mem_gib']:.1f} | {wf:.2f} | {cf:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llada-8b,dream-7b")
    ap.add_argument("--caches", default="none,prefix,dual,dllm,d2cache")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--shapes", default="256x256,512x512", help="prompt x generation lengths")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--sub-block", type=int, default=0,
                    help="decode a block-diffusion model in sub-blocks of this length (Fast-dLLM v2's release: 8); "
                         "0 = its own blocks")
    ap.add_argument("--strategy", default="vanilla", help="decoding strategy (vanilla: one token per step)")
    ap.add_argument("--caches-b1", default="", help="caches timed at batch 1 (default: --caches)")
    ap.add_argument("--blocks-b1", type=int, default=0, help="blocks decoded at batch 1 (0 = all)")
    ap.add_argument("--blocks-b16", type=int, default=1, help="blocks decoded at batch > 1 (0 = all)")
    ap.add_argument("--eager", default="none,dual", help="caches also timed without CUDA graphs (batch 1, 256/256)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--profile", default="", help="model:cache pairs to profile (GPU), e.g. llada-8b:dual")
    ap.add_argument("--masked-attention", action="store_true",
                    help="block-causal models attend through SDPA with the explicit mask instead of flash attention's "
                         "variable-length kernel (models/flash.py): the A/B of that kernel")
    ap.add_argument("--out", default="bench_caches.json")
    args = ap.parse_args()
    if args.masked_attention:
        from lmeval_dllm.models import transformer

        transformer.flash_supported = lambda q, k: False

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        models = args.models.split(",") if args.models.startswith("tiny-") else ["tiny-llada", "tiny-dream"]
        shapes = [(16, 32), (24, 48)]
        block = 8
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        models = args.models.split(",")
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        block = args.block
    batches = [int(b) for b in args.batches.split(",")]
    caches = args.caches.split(",")
    eager = [c for c in args.eager.split(",") if c]

    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "argv": sys.argv}
    floors = measure_floors(device) if device.type == "cuda" else {"copy_bytes_per_s": 1e11,
                                                                   "matmul_flops_per_s": 1e11}
    info.update(floors)
    print(json.dumps(info), flush=True)
    rows: list[dict] = []

    def save(pending=()):
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"info": info, "rows": rows + list(pending)}, f, indent=1)

    if args.profile:
        for spec in args.profile.split(","):
            name, cache_name = spec.split(":")
            try:
                print(profile_step(name, cache_name, device), flush=True)
            except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the timing run
                print(f"profile {spec} failed: {type(e).__name__}: {e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    # Batch 1 of every model first: the most important rows survive a run cut short.
    for B in batches:
        for name in models:
            model = build_model(name, device, dtype)
            with torch.no_grad():  # compile the fused elementwise kernels for this batch size outside the timings
                ids = torch.randint(0, model.args.mask_token_id, (B, shapes[0][0]), device=device)
                model(ids, torch.arange(ids.shape[1], device=device).expand(B, -1))
            # a block-diffusion model decodes its own blocks (cache=block), or sub-blocks of them (--sub-block)
            own = (args.sub_block or model.args.block_size) if model.args.block_size else block
            for P, G in shapes:
                rows += measure_shape(model, name, B, P, G, own, caches, eager, args, floors, save, device)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info["fused_elementwise"] = fused_status()
    save()
    print("fused elementwise kernels:", info["fused_elementwise"])
    print(table(rows, floors))


if __name__ == "__main__":
    main()
