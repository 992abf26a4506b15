"""What the model-family tests share (a plain module: test files import it): a tiny checkpoint's official files
read back as the release would see them (tests/test_sdar.py, test_llada2.py, test_llada_moe.py,
test_fast_dllm_v2.py), and the pieces of the HF math their reference forwards are written from."""

from __future__ import annotations

import glob
import json
import os

import torch
import torch.nn.functional as F


def official(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, {official name: tensor} of every ``*.safetensors`` shard) of a checkpoint directory."""
    from safetensors.torch import load_file

    tensors = {}
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        tensors.update(load_file(path))
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f), tensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm over the last dim of ``x`` (float32 here, so no casts)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(theta: float, dim: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, dim) of HF's default RoPE over ``dim`` rotated dims at positions 0..T-1 (frequencies repeated
    for the two halves, as ``rotate_half`` pairs them)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.arange(T).float()[:, None] * inv_freq
    return torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``apply_rotary_pos_emb`` over the last dim of ``x``: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def swiglu(w: dict[str, torch.Tensor], x: torch.Tensor, p: str) -> torch.Tensor:
    """The HF SwiGLU MLP whose official weights are ``w[p + "gate_proj.weight"]`` ... applied to ``x``."""
    return F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T) @ w[p + "down_proj.weight"].T
