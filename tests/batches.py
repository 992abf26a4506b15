"""Left-padded prompt batches for tests that decode several prompts at once (a plain module: tests import it)."""

from __future__ import annotations

import torch


def pad_left(pad_token_id: int, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ids (B, P) left-padded with ``pad_token_id``, mask (B, P) bool (False on padding)."""
    P = max(map(len, encoded))
    ids = torch.tensor([[pad_token_id] * (P - len(e)) + e for e in encoded])
    mask = torch.tensor([[False] * (P - len(e)) + [True] * len(e) for e in encoded])
    return ids, mask


def left_pad(tok, prompts: list[str]):
    """Each prompt's token ids (no special tokens), and the left-padded batch (ids (B, P), mask (B, P))."""
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    return (enc, *pad_left(tok.pad_token_id, enc))
