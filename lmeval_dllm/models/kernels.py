"""The elementwise stages of the transformer, each written once, and their fused CUDA versions.

On the CPU they run as written (bit-identical to the released models); on CUDA each becomes one fused kernel
(``torch.compile``) unless the model was built with ``fuse=False``. Unfused, a decode step at batch 1 is ~1500
kernel launches, two thirds of them these few-microsecond elementwise ops, and at large batch their extra passes
over memory cost as much as a third of the step (docs/performance.md).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back before the affine weight, as both families' HF code does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., Dh) rotated in its first R = cos.shape[-1] dims, each half of those R rotated against the other
    (HF's rotate_half); the last Dh - R dims pass through unchanged. R < Dh is partial RoPE (LLaDA2:
    ``partial_rotary_factor`` 0.5, the release's ``apply_rotary_pos_emb``: ``q[..., :rotary_dim]``)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat((rot * cos + rotate_half(rot) * sin, x[..., r:]), dim=-1)


def rope_fp32(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """LLaDA (rope_full_precision): rotate q and k in float32, cast back. cos/sin (B, 1, Q, R) float32."""
    return rotary(q.float(), cos, sin).to(q.dtype), rotary(k.float(), cos, sin).to(k.dtype)


def rope_native(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Dream / HF Qwen2 / LLaDA2: cos/sin cast to the model dtype first, rotation in the model dtype."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return rotary(q, cos, sin), rotary(k, cos, sin)


def norm_rope_fp32(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor):
    """Per-head q/k RMSNorm (``qk_norm``: one weight of head_dim for all heads), then :func:`rope_fp32`."""
    return rope_fp32(rms_norm(q, wq, eps), rms_norm(k, wk, eps), cos, sin)


def norm_rope_native(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                     cos: torch.Tensor, sin: torch.Tensor):
    """Per-head q/k RMSNorm, then :func:`rope_native` (SDAR, LLaDA-MoE, LLaDA2): one kernel instead of three."""
    return rope_native(rms_norm(q, wq, eps), rms_norm(k, wk, eps), cos, sin)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next RMSNorm: (h + delta, rms_norm(h + delta)), one kernel instead of two."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate; up] (..., 2I) -> silu(gate) * up (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rows_of_heads(x: torch.Tensor) -> tuple[int, ...]:
    """q, k, v (B, H, Q, Dh), cos, sin (B, 1, Q, Dh), K/V stores (B, Hkv, S, Dh): batch and rows (or slots);
    a (Q,) slot index: its length; the q/k norm weights (Dh,): none."""
    if x.dim() == 4:
        return (0, 2)
    return (0,) if x.dim() == 1 and not x.is_floating_point() else ()


for _rope in (rope_fp32, rope_native, norm_rope_fp32, norm_rope_native):
    _rope.row_dims = _rows_of_heads


_STORING: dict[Callable, Callable] = {}


def storing(rope: Callable) -> Callable:
    """``rope`` (one of the RoPE stages: (q, k, *args) -> (q, k)) followed by the K/V write of a cache whose
    ``update`` copies the rows' K/V into slots (``LayerHooks.kv_slots``): the function
    ``(q, k, v, k_store, v_store, pos, *args) -> q`` that also sets ``k_store[:, :, pos] = k`` (rotated) and
    ``v_store[:, :, pos] = v``. Fused, the rotation writes straight into the stores: one kernel where the RoPE
    kernel and two index copies were three."""
    if rope not in _STORING:
        def rope_store(q, k, v, k_store, v_store, pos, *args):
            q, k = rope(q, k, *args)
            k_store[:, :, pos] = k
            v_store[:, :, pos] = v
            return q

        rope_store.__name__ = rope_store.__qualname__ = f"{rope.__name__}_store"
        rope_store.row_dims = _rows_of_heads
        _STORING[rope] = rope_store
    return _STORING[rope]


def _row_dims(fn: Callable, x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of an argument of ``fn`` that change from step to step: batch and rows (the rows a cache
    runs vary by step and block). Hidden sizes and heads are fixed per model. A function may say otherwise with
    a ``row_dims(x)`` attribute (a cache's statistics over every key also vary with the canvas length)."""
    custom = getattr(fn, "row_dims", None)
    if custom is not None:
        return custom(x)
    return tuple(range(x.dim() - 1)) if x.dim() > 1 else ()  # (..., features)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: dynamo's and inductor's own errors (backend failures are wrapped in
    them), and a missing compiler toolchain. Anything else (CUDA out of memory above all) is a real error of
    the step and must reach the caller: the OOM batch split in ``lm.py`` depends on seeing it."""
    errors: list[type[BaseException]] = [ImportError]
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:  # pragma: no cover - torch builds without dynamo
        pass
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(errors)


def _silence_inductor_notes() -> None:
    """Once per process: inductor's advice while compiling our float32 statistics (Elastic-Cache's attention
    probabilities stay float32, as the release computes them) and its note on its softmax strategy are not
    actionable by a user of the harness."""
    global _NOTES_SILENCED
    if not _NOTES_SILENCED:
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication")
        warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly")
        _NOTES_SILENCED = True


_NOTES_SILENCED = False


class _Fused:
    """``fn`` compiled into fused kernels; the plain function again, with one warning, if compilation fails on
    this machine. Only compilation errors turn fusion off; out-of-memory and every other error is re-raised.

    Only the batch and row sizes are compiled as symbols (one compilation serves every step shape); feature
    sizes stay constants. Fully symbolic shapes cost 2-3x on an H100 at LLaDA-8B's sizes (batch 1, 512 rows:
    RoPE 18 -> 7 us, SwiGLU 24 -> 9 us, RMSNorm 5.7 -> 2.9 us per call; docs/performance.md)."""

    def __init__(self, fn: Callable):
        import torch._dynamo

        # One compilation per dtype, per batch of 1 or more, per eps constant: more than dynamo's default of 8.
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _silence_inductor_notes()
        self.fn, self.compiled, self.failed = fn, torch.compile(fn, dynamic=False, fullgraph=True), False
        self._mark_dynamic = torch._dynamo.maybe_mark_dynamic
        self._errors = _compile_errors()

    def __call__(self, *args):
        if not self.failed:
            try:
                for a in args:
                    if isinstance(a, torch.Tensor):
                        for d in _row_dims(self.fn, a):
                            self._mark_dynamic(a, d)  # size 1 stays a constant (dynamo's rule)
                return self.compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except self._errors as e:  # fall back to the identical unfused computation
                if "out of memory" in str(e).lower():
                    raise
                warnings.warn(f"fusing {self.fn.__name__} failed ({type(e).__name__}: {e}); running it unfused")
                self.failed = True
        return self.fn(*args)


_FUSED: dict[Callable, _Fused] = {}


def kernel(fn: Callable, x: torch.Tensor, fuse: bool = True) -> Callable:
    """The version of elementwise stage ``fn`` to run on ``x``'s device: fused on CUDA when ``fuse``, the plain
    function otherwise. Compilations are shared by every model of the process (they depend only on ``fn``)."""
    if not (fuse and x.is_cuda):
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = _Fused(fn)
    return _FUSED[fn]


def fused_status() -> dict[str, bool]:
    """{stage name: fused} for every stage compiled so far in this process (False = fell back to unfused)."""
    return {fn.__name__: not f.failed for fn, f in _FUSED.items()}
