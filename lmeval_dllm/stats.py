"""Per-request decoding statistics and their aggregate.

Definitions (per request; a request is one prompt of a batch):

- ``nfe``: forward passes during which the request was still decoding (the model ran on the whole batch;
  a request that finished early stops counting).
- ``answer_tokens``: generated tokens before the first stop token (EOS / end-of-turn), or ``gen_length``.
- ``committed_tokens``: positions the sampler committed (re-masked positions count again when re-committed).
- ``wall_time_s``: wall time of the ``generate`` call of the request's batch (device synchronised).
- ``tokens_per_s``: ``answer_tokens / wall_time_s``; ``tokens_per_step``: ``answer_tokens / nfe``.

The aggregate sums tokens and forward passes and counts each batch's time once, so ``tokens_per_s`` is total
answer tokens over total generation time (throughput), not a mean of per-request ratios. Under several
processes the logs of all processes are merged (:meth:`StatsLog.merge`): times add up, so ``tokens_per_s`` is
the throughput of one process, not of the whole run.

Likelihood requests (``loglikelihood``, ``loglikelihood_rolling``) are counted apart: requests, Monte-Carlo
rows scored, forward passes and their wall time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class RequestStats:
    prompt_tokens: int
    gen_length: int
    nfe: int
    answer_tokens: int
    committed_tokens: int
    wall_time_s: float
    batch_size: int

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.answer_tokens / self.nfe if self.nfe else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "tokens_per_step": self.tokens_per_step}


@dataclass
class StatsLog:
    requests: list[RequestStats] = field(default_factory=list)
    batch_times: list[float] = field(default_factory=list)
    batch_steps: list[int] = field(default_factory=list)
    peak_memory_gb: Optional[float] = None
    likelihood_requests: int = 0
    likelihood_rows: int = 0  # Monte-Carlo samples scored (and greedy-check passes)
    likelihood_forward_passes: int = 0
    likelihood_time_s: float = 0.0
    oom_splits: int = 0  # batches split in two after a CUDA out-of-memory error

    @classmethod
    def merge(cls, logs: list["StatsLog"]) -> "StatsLog":
        """One log from the logs of several processes (requests in process order; peak memory: the largest)."""
        out = cls()
        for log in logs:
            out.requests.extend(log.requests)
            out.batch_times.extend(log.batch_times)
            out.batch_steps.extend(log.batch_steps)
            if log.peak_memory_gb is not None:
                out.peak_memory_gb = max(out.peak_memory_gb or 0.0, log.peak_memory_gb)
            out.likelihood_requests += log.likelihood_requests
            out.likelihood_rows += log.likelihood_rows
            out.likelihood_forward_passes += log.likelihood_forward_passes
            out.likelihood_time_s += log.likelihood_time_s
            out.oom_splits += log.oom_splits
        return out

    def add_batch(self, stats: list[RequestStats], wall_time_s: float, steps: int) -> None:
        self.requests.extend(stats)
        self.batch_times.append(wall_time_s)
        self.batch_steps.append(steps)

    def summary(self) -> dict:
        out = self._generation_summary()
        if self.likelihood_requests:
            out["likelihood"] = {
                "requests": self.likelihood_requests,
                "rows": self.likelihood_rows,
                "forward_passes": self.likelihood_forward_passes,
                "total_time_s": self.likelihood_time_s,
            }
        if self.oom_splits:
            out["oom_splits"] = self.oom_splits
        return out

    def _generation_summary(self) -> dict:
        n = len(self.requests)
        if n == 0:
            return {"requests": 0}
        time = sum(self.batch_times)
        answer = sum(r.answer_tokens for r in self.requests)
        nfe = sum(r.nfe for r in self.requests)
        out = {
            "requests": n,
            "batches": len(self.batch_times),
            "mean_nfe": nfe / n,
            "mean_answer_tokens": answer / n,
            "mean_committed_tokens": sum(r.committed_tokens for r in self.requests) / n,
            "total_answer_tokens": answer,
            "total_forward_passes": sum(self.batch_steps),
            "total_time_s": time,
            "tokens_per_s": answer / time if time > 0 else 0.0,
            "tokens_per_step": answer / nfe if nfe else 0.0,
            "mean_latency_s": sum(r.wall_time_s / r.batch_size for r in self.requests) / n,
        }
        if self.peak_memory_gb is not None:
            out["peak_memory_gb"] = self.peak_memory_gb
        return out

    def write_jsonl(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in self.requests:
                f.write(json.dumps(r.to_dict()) + "\n")


class StatsReporting:
    """What an lm-eval model that keeps a :class:`StatsLog` in ``self.stats`` does with it (``dllm`` and
    ``hf_ar``): log it after ``generate_until``, write it to ``self.stats_path``, gather it from every process
    along with lm-eval's own results, and put the aggregate into the results JSON (``get_model_info`` ->
    ``config.dllm_stats``). The model sets ``stats``, ``stats_path``, ``rank`` and ``world_size``."""

    stats: StatsLog
    stats_path: Optional[str] = None
    _merged_stats: Optional[StatsLog] = None  # all processes' statistics, on the main process

    def _log_stats(self, logger: logging.Logger, label: str) -> None:
        logger.info("%s decoding statistics%s: %s", label, f" (process {self.rank})" if self.world_size > 1 else "",
                    self.stats.summary())
        if self.world_size == 1:  # several processes: the main one writes everyone's, see gather_object
            self._write_stats(self.stats)

    def _write_stats(self, stats: StatsLog) -> None:
        if self.stats_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.stats_path)), exist_ok=True)
            stats.write_jsonl(self.stats_path)

    def gather_object(self, obj, dst: int = 0):
        """lm-eval gathers per-sample metrics (and logged samples) to the main process with this, on every
        process, once all requests are done. The decoding statistics travel in the same collective: no extra
        synchronisation point that a process could skip (e.g. one whose requests were all in the
        ``--use_cache`` database) and hang on."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object((obj, self.stats), object_gather_list=gathered, dst=dst)
        if self.rank != dst:
            return None
        self._merged_stats = StatsLog.merge([stats for _, stats in gathered])
        self._write_stats(self._merged_stats)  # once, by one process
        return [o for o, _ in gathered]

    def stats_info(self) -> dict:
        """The results JSON's share (lm-eval puts ``get_model_info()`` into ``results['config']``)."""
        stats = self._merged_stats if self._merged_stats is not None else self.stats
        info = {"dllm_stats": stats.summary()}
        if self.world_size > 1:
            info["dllm_processes"] = self.world_size
        if self.stats_path:
            info["dllm_stats_path"] = self.stats_path
        return info
