"""The transformer both model families share, and the checkpoint loader.

LLaDA (arXiv:2502.09992) and Dream (arXiv:2508.15487) are both pre-norm Llama-style transformers with RMSNorm,
RoPE, SwiGLU and *bidirectional* attention; they differ in weight names, q/k/v bias, RoPE precision and in
which output row predicts which position (Dream is "adapted from AR": row i predicts position i+1). The family
files (``llada.py``, ``dream.py``) read ``config.json`` into :class:`ModelArgs` and name the weights; everything
else lives here.

Caches plug in through one verb: inside attention, ``k, v = cache.update(layer_idx, k, v)`` stores the fresh
keys/values of the rows being run and returns the full-length keys/values to attend to (gpt-fast's
``KVCache.update``). The model never asks which cache it has. A cache that needs more than K/V (dLLM-Cache
reuses attention/FFN outputs) drives the blocks itself through their public verbs ``qkv``, ``attend``, ``mlp``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from lmeval_dllm.caches.base import Cache

# SDPA grew native grouped-query attention in torch 2.5; before that we expand K/V ourselves.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass(frozen=True)
class ModelArgs:
    family: str  # "llada" | "dream"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the LM head (LLaDA: embedding_size, padded past the tokenizer's vocabulary)
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    rope_fp32: bool  # LLaDA rotates q/k in float32 (rope_full_precision); Dream in the model dtype (HF Qwen2)
    tie_embeddings: bool
    max_position: int
    mask_token_id: int
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    logit_shift: int  # 0: row i predicts position i (LLaDA); 1: row i-1 predicts position i (Dream)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ---------------------------------------------------------------------------------------------------------------
# Elementwise stages, each written once. On the CPU they run as written (bit-identical to the released models); on
# CUDA each becomes one fused kernel (torch.compile). Unfused, a decode step at batch 1 is ~1500 kernel launches,
# two thirds of them these few-microsecond elementwise ops, and at large batch their extra passes over memory cost
# as much as a third of the step (docs/performance.md).

FUSE_ON_CUDA = True  # set False to run the plain PyTorch ops on CUDA too (e.g. to measure what fusion buys)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back before the affine weight, as both families' HF code does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_fp32(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """LLaDA (rope_full_precision): rotate q and k in float32, cast back. cos/sin (B, 1, Q, Dh) float32."""
    q32, k32 = q.float(), k.float()
    return (q32 * cos + rotate_half(q32) * sin).to(q.dtype), (k32 * cos + rotate_half(k32) * sin).to(k.dtype)


def rope_native(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Dream / HF Qwen2: cos/sin cast to the model dtype first, rotation in the model dtype."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate; up] (..., 2I) -> silu(gate) * up (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _row_dims(fn: Callable, x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of an argument of ``fn`` that change from step to step: batch and rows (the rows a cache
    runs vary by step and block). Hidden sizes and heads are fixed per model."""
    if fn in (rope_fp32, rope_native) and x.dim() == 4:  # q, k (B, H, Q, Dh); cos, sin (B, 1, Q, Dh)
        return (0, 2)
    return tuple(range(x.dim() - 1))  # (..., features)


class _Fused:
    """``fn`` compiled into fused kernels; the plain function again, with one warning, if compilation fails on
    this machine.

    Only the batch and row sizes are compiled as symbols (one compilation serves every step shape); feature
    sizes stay constants. Fully symbolic shapes cost 2-3x on an H100 at LLaDA-8B's sizes (batch 1, 512 rows:
    RoPE 18 -> 7 us, SwiGLU 24 -> 9 us, RMSNorm 5.7 -> 2.9 us per call; docs/performance.md)."""

    def __init__(self, fn: Callable):
        import torch._dynamo

        # One compilation per dtype, per batch of 1 or more, per eps constant: more than dynamo's default of 8.
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        self.fn, self.compiled, self.failed = fn, torch.compile(fn, dynamic=False, fullgraph=True), False
        self._mark_dynamic = torch._dynamo.maybe_mark_dynamic

    def __call__(self, *args):
        if not self.failed:
            try:
                for a in args:
                    if isinstance(a, torch.Tensor) and a.dim() > 1:
                        for d in _row_dims(self.fn, a):
                            self._mark_dynamic(a, d)  # size 1 stays a constant (dynamo's rule)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - fall back to the identical unfused computation
                import warnings

                warnings.warn(f"fusing {self.fn.__name__} failed ({type(e).__name__}: {e}); running it unfused")
                self.failed = True
        return self.fn(*args)


_FUSED: dict[Callable, _Fused] = {}


def kernel(fn: Callable, x: torch.Tensor) -> Callable:
    """The version of elementwise stage ``fn`` to run on ``x``'s device (fused on CUDA, see above)."""
    if not (FUSE_ON_CUDA and x.is_cuda):
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = _Fused(fn)
    return _FUSED[fn]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the affine weight, as both families' HF code does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel(rms_norm, x)(x, self.weight, self.eps)


class Block(nn.Module):
    """One pre-norm transformer layer: ``h + Attn(norm(h))`` then ``h + MLP(norm(h))``.

    q/k/v and gate/up projections are fused on load (``wqkv``, ``w13``): one matmul instead of three/two.
    """

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_fp32 = args.rope_fp32
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qkv_split = (q_dim, kv_dim, kv_dim)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.wqkv = nn.Linear(args.dim, q_dim + 2 * kv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(q_dim, args.dim, bias=False)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # [gate; up]
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h (B, Q, D) -> q (B, Hq, Q, Dh), k and v (B, Hkv, Q, Dh); RoPE applied to q and k."""
        B, Q, _ = h.shape
        q, k, v = self.wqkv(self.attn_norm(h)).split(self.qkv_split, dim=-1)
        q = q.view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rope = rope_fp32 if self.rope_fp32 else rope_native  # LLaDA rotates in float32, Dream in the model dtype
        q, k = kernel(rope, q)(q, k, cos, sin)
        return q, k, v

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, Q, D) -> v (B, Hkv, Q, Dh): the value projection alone, a third of ``qkv``'s cost for LLaDA
        (dLLM-Cache compares fresh and cached values to choose the rows it recomputes)."""
        B, Q, _ = h.shape
        start = self.qkv_split[0] + self.qkv_split[1]
        bias = None if self.wqkv.bias is None else self.wqkv.bias[start:]
        v = F.linear(self.attn_norm(h), self.wqkv.weight[start:], bias)
        return v.view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor]):
        """q (B, Hq, Q, Dh) over k, v (B, Hkv, T, Dh); attn_mask (B, 1, 1|Q, T) bool, True = attend.

        Bidirectional (no causal mask). Returns the output projection (B, Q, D).
        """
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
            else:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        B, _, Q, _ = q.shape
        return self.wo(out.transpose(1, 2).reshape(B, Q, -1))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: w2(silu(gate(x)) * up(x)) on the normed input. (B, Q, D) -> (B, Q, D)."""
        gate_up = self.w13(self.mlp_norm(h))
        return self.w2(kernel(swiglu, gate_up)(gate_up))

    def forward(self, h, cos, sin, attn_mask, cache: Optional["Cache"] = None):
        q, k, v = self.qkv(h, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        h = h + self.attend(q, k, v, attn_mask)
        return h + self.mlp(h)


class DiffusionLM(nn.Module):
    """A masked-diffusion LM: token ids in, logits per position out, bidirectional attention.

    ``predict`` is what the decode loop calls: it takes the canvas rows that are run and the *target* columns
    whose token distributions the sampler needs, and hides the family's logit shift, so samplers always see
    "logits of position i" at index i.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        a = self.args
        return 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32, device=device) / a.head_dim))

    def init_buffers(self, device) -> None:
        """Recompute non-persistent buffers after building on the meta device and loading weights."""
        self.inv_freq = self._inv_freq(device)

    @property
    def logit_shift(self) -> int:
        return self.args.logit_shift

    @property
    def mask_token_id(self) -> int:
        return self.args.mask_token_id

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def rope(self, position_ids: torch.Tensor):
        """position_ids (B, Q) -> cos, sin (B, 1, Q, Dh) in float32."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, Q, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, Q, Dh)
        return emb.cos(), emb.sin()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head. h (B, K, D) -> logits (B, K, V) in the model dtype."""
        return self.output(self.norm(h))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional["Cache"] = None,
        logits_index: Optional[slice | torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run rows through the stack.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, Q)`): the rows to run (the whole canvas, or the subset
                a cache recomputes).
            position_ids (`torch.LongTensor` of shape `(B, Q)`): RoPE positions of those rows.
            attention_mask (`torch.BoolTensor`, *optional*): True = may attend. Either a key-padding mask
                `(B, T)` over the keys attended to (T = Q without a cache, the full canvas with one), or a full
                mask `(B, 1, Q, T)` for structured attention (e.g. WINO's leave-one-out shadow block).
            cache: per-layer K/V store (see ``lmeval_dllm.caches``).
            logits_index: which of the Q rows get logits (a slice, or a `(K,)` LongTensor of row indices); all
                when None. The LM head is the largest matmul of a step (126k x 4096 for LLaDA), so it only runs
                where a sampler looks.

        Returns:
            logits (`torch.Tensor` of shape `(B, K, V)`), K = rows selected by ``logits_index``.
        """
        h = self.tok_embeddings(input_ids)  # (B, Q, D)
        cos, sin = self.rope(position_ids)
        mask = attention_mask
        if mask is not None and mask.dim() == 2:
            mask = mask[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if logits_index is not None:
            h = h[:, logits_index]
        return self.head(h)

    def predict(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        targets: slice,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional["Cache"] = None,
        query_start: int = 0,
    ) -> torch.Tensor:
        """Logits for the canvas columns ``targets``, aligned so that index i is the distribution of column
        ``targets.start + i``.

        ``input_ids`` holds canvas columns ``[query_start, query_start + Q)``. Dream reads column t from row
        t - 1, so for Dream those rows must include ``targets.start - 1`` (the caches account for this).
        """
        start = targets.start - self.logit_shift - query_start
        stop = targets.stop - self.logit_shift - query_start
        if start < 0 or stop > input_ids.shape[1]:
            raise ValueError(
                f"targets [{targets.start}, {targets.stop}) need rows [{start + query_start}, {stop + query_start}) "
                f"but rows [{query_start}, {query_start + input_ids.shape[1]}) were given"
                + (" (Dream predicts column t from row t-1: the prompt must not be empty)" if self.logit_shift else "")
            )
        return self(input_ids, position_ids, attention_mask, cache, logits_index=slice(start, stop))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint loading


@dataclass(frozen=True)
class Slot:
    """Where an official weight goes: our parameter name, and its slice along dim 0 when fused."""

    name: str
    part: int = 0  # index among the tensors concatenated (dim 0) into `name`
    parts: int = 1
    rows: int = 0  # rows of this piece when fused (parts > 1)


def resolve_checkpoint_dir(pretrained: str, revision: Optional[str] = None) -> str:
    """A local directory as is; otherwise a hub id, fetched (config, weights) into the HF cache."""
    if os.path.isdir(pretrained):
        return pretrained
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(pretrained, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
        raise OSError(
            f"pretrained={pretrained!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {e}). Give a local checkpoint directory (config.json + *.safetensors) "
            f"or check the id and your network / HF_HUB_OFFLINE setting."
        ) from e


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory!r}: not a Hugging Face checkpoint directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory!r} (only safetensors checkpoints load)")
    return [os.path.join(directory, n) for n in files]


def load_weights(
    model: DiffusionLM,
    directory: str,
    weight_names: dict[str, Slot],
    *,
    device: torch.device,
    dtype: torch.dtype,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Load an official checkpoint into ``model`` (built on the meta device), checking every name and shape.

    ``weight_names`` maps every official tensor name to the :class:`Slot` it fills. A tensor in the files that
    is not in the map (and not ``ignore``-d), a name of the map missing from the files, or a shape that differs
    from what config.json implies is an error naming the official key.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    seen: set[str] = set()
    for path in _safetensors_files(directory):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                slot = weight_names.get(key)
                if slot is None:
                    if ignore(key):
                        continue
                    raise ValueError(
                        f"unexpected weight {key!r} in {os.path.basename(path)}: not part of the "
                        f"{model.args.family} architecture that config.json describes"
                    )
                tensor = f.get_tensor(key).to(dtype)
                expected = _part_shape(params[slot.name], slot)
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"weight {key!r} has shape {tuple(tensor.shape)}, but config.json implies {expected}"
                    )
                pieces.setdefault(slot.name, {})[slot.part] = tensor
                seen.add(key)
    missing = [k for k in weight_names if k not in seen]
    if missing:
        raise ValueError(
            f"missing weight {missing[0]!r} in {directory!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    state = {}
    for name in params:  # named_parameters() lists a tied LM head once, under tok_embeddings
        parts = pieces[name]
        state[name] = parts[0] if len(parts) == 1 else torch.cat([parts[i] for i in range(len(parts))], dim=0)
    if model.args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers(device)


def _part_shape(param: torch.Tensor, slot: Slot) -> tuple[int, ...]:
    """Shape of one piece of a (possibly fused) parameter. Fused pieces are given by their row counts."""
    if slot.parts == 1:
        return tuple(param.shape)
    return (slot.rows,) + tuple(param.shape[1:])
