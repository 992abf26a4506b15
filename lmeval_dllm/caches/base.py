"""The cache interface, and the no-cache baseline.

A cache decides, each step, which canvas rows run through the transformer and supplies the keys/values of
the others. It meets the model in one place, inside attention: ``k, v = cache.update(layer_idx, k, v)``
receives the fresh K/V of the rows being run and returns the full-length K/V to attend to (gpt-fast's
``KVCache.update``). Lifecycle hooks have no-op defaults. Per-call storage is allocated in :meth:`setup`
and reused for every step.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lmeval_dllm.models.common import DiffusionLM
from lmeval_dllm.samplers.base import DecodeState, StepOutput


class Cache:
    """No cache: every step runs the whole canvas (the exact reference computation)."""

    name: ClassVar[str] = "none"

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        """Called once per ``generate`` call, after the canvas is built: allocate storage here."""

    def begin_block(self, state: DecodeState) -> None:
        """Called when a block starts."""

    def forward(self, model: DiffusionLM, state: DecodeState, targets: slice) -> torch.Tensor:
        """Logits (B, len(targets), V) of the canvas columns ``targets`` for this step."""
        return model.predict(state.x, state.position_ids, targets, attention_mask=state.attention_mask)

    def end_step(self, state: DecodeState, out: StepOutput) -> None:
        """Called after the sampler's decision was applied to ``state.x``."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the fresh k, v (B, Hkv, Q, Dh) of the rows being run; return the K/V to attend to."""
        return k, v
