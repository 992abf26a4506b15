"""Running a different set of rows for each batch row, with static shapes.

A cache that recomputes, per batch row, a set of positions whose size differs between rows (dLLM-Cache, d2Cache)
keeps one tensor shape per step (no per-row Python, capturable by CUDA graphs) by running ``M`` = the largest
set size for every row: ``index`` (B, M) lists the positions run, and ``real`` (B, M) says which of them count.
The others ("dummies") are computed and thrown away: their writes go to a trash slot at index T of every
(B, T + 1, ...) store, so a row's results never depend on the rows batched with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, T, D), index (B, M) -> (B, M, D)."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def gather_rope(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cos or sin table (B, 1, T, Dh), index (B, M) -> (B, 1, M, Dh)."""
    return table.gather(2, index[:, None, :, None].expand(-1, 1, -1, table.shape[-1]))


def store_index(index: torch.Tensor, real: torch.Tensor, trash: int) -> torch.Tensor:
    """(B, M): the position of each real row, ``trash`` for dummies."""
    return torch.where(real, index, trash)


def scatter_rows_(store: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """store (B, T + 1, D)[b, slots[b, m]] = rows[b, m] (B, M, D)."""
    store.scatter_(1, slots[..., None].expand(-1, -1, store.shape[-1]), rows)


def scatter_heads_(store: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """store (B, H, T + 1, Dh)[b, :, slots[b, m]] = rows[b, :, m] (B, H, M, Dh)."""
    store.scatter_(2, slots[:, None, :, None].expand(-1, store.shape[1], -1, store.shape[-1]), rows)


def rank_ascending(values: torch.Tensor) -> torch.Tensor:
    """values (B, N) -> (B, N) long rank, 0 = smallest; equal values rank by position (lower first)."""
    order = torch.sort(values, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(values.shape[-1], device=values.device).expand_as(order))
    return rank


@dataclass(frozen=True)
class RowSubset:
    """The rows of the residual stream (B, T, D) one layer recomputes: ``index`` (B, M) positions, of which
    ``real`` (B, M) count; the dummies write to slot ``trash`` (= T) of the cache's (B, T + 1, ...) stores."""

    index: torch.Tensor  # (B, M) long
    real: torch.Tensor  # (B, M) bool
    trash: int

    @property
    def count(self) -> int:
        return self.index.shape[1]

    @property
    def slots(self) -> torch.Tensor:
        """(B, M) long: where each row's outputs are stored (its position, or the trash slot)."""
        return store_index(self.index, self.real, self.trash)
