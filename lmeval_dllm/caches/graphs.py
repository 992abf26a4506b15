"""CUDA graphs for a cache's forward pass: one graph per static shape, captured on first use, replayed after.

At batch 1 a decode step is a few hundred small kernels (about a dozen per layer), and launching them from
Python costs more than the GPU needs to run them (design.md: a 32-row block against cached K/V is
launch-bound). A graph replays the whole forward with one launch. It needs static shapes and fixed addresses:
the caches preallocate their K/V (and feature) storage per call and pass every per-step tensor (token ids,
positions, query indices) as an argument, which :class:`StepGraphs` copies into the graph's own input buffers
before each replay.

On the CPU, or when built with ``enabled=False`` (``cuda_graphs=False`` of the cache), :meth:`StepGraphs.run`
simply calls the function.

Graphs are bounded: each holds its own activation memory (about 0.15 GiB per canvas shape at LLaDA-8B, batch 8),
so a set that saw ``capacity`` shapes is dropped whole before the next capture, and the caches drop theirs when
the batch shape changes (``Cache.setup``).
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Hashable, Optional, Union

import torch


class StepGraphs:
    """Per-shape CUDA graphs of one function ``fn(*tensors) -> tensor`` (or a tuple of tensors).

    ``run(key, fn, *args)``: the first call with a new ``key`` runs ``fn`` eagerly (its result and side effects
    are this step's) and then records it; later calls copy ``args`` into the recorded inputs and replay. The key
    must determine every shape and every Python-level branch ``fn`` takes; tensors that ``fn`` reads or writes
    besides its arguments (K/V storage) must keep their address until :meth:`reset`.

    All graphs of one instance share a memory pool (they never run concurrently). The returned tensor is the
    graph's output buffer: it is overwritten by the next replay of the same graph, so consume it first (the decode
    loop does: the sampler reads the logits before the next step).
    """

    def __init__(self, *, enabled: bool = True, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity}")
        self.enabled, self.capacity = enabled, capacity
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[Any], Any]] = {}
        self._pool = None
        self.captures = 0  # graphs recorded since construction (for tests and benchmarks)
        self.replays: dict[Hashable, int] = {}  # replays per key of the graphs held (for benchmarks)

    def reset(self) -> None:
        """Drop every graph; call when storage is reallocated. Their pool is dropped too: once its last graph is
        gone, PyTorch's allocator refuses new captures into it while any of its blocks is still alive (an output
        buffer the caller holds), so the next capture starts a new pool and the old one is freed with its last
        tensor."""
        self._graphs.clear()
        self.replays.clear()
        self._pool = None

    def _admit(self) -> None:
        """Before capturing a new graph: a set already at ``capacity`` is dropped whole (bounded memory)."""
        if len(self._graphs) >= self.capacity:
            self.reset()

    def __len__(self) -> int:
        return len(self._graphs)

    def most_replayed(self) -> tuple[Optional[torch.cuda.CUDAGraph], int]:
        """(the graph replayed most often, its replay count), or (None, 0): a benchmark times it alone."""
        if not self.replays:
            return None, 0
        key = max(self.replays, key=self.replays.__getitem__)
        return self._graphs[key][0], self.replays[key]

    def run(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Union[torch.Tensor, tuple]:
        device: Optional[torch.device] = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if not self.enabled or device is None or device.type != "cuda":
            return fn(*args)
        entry = self._graphs.get(key)
        if entry is not None:
            graph, static, out = entry
            for buf, a in zip(static, args):
                if isinstance(buf, torch.Tensor):
                    buf.copy_(a)
            graph.replay()
            self.replays[key] = self.replays.get(key, 0) + 1
            return out

        self._admit()
        # Warm up on a side stream (lazy library initialisation stays out of the capture): this eager run *is*
        # the step. Recording then executes nothing, so side effects (K/V writes) happen exactly once.
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = fn(*args)
        current.wait_stream(side)
        for t in result if isinstance(result, tuple) else (result,):
            t.record_stream(current)  # allocated on the side stream, used on this one
        static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: collecting an unreachable CUDAGraph (of a cache dropped earlier)
        # resets it, which is not permitted during a capture and invalidates this one.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(*static)
        finally:
            if collecting:
                gc.enable()
        self._graphs[key] = (graph, static, out)
        self.captures += 1
        return result
