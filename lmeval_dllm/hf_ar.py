"""lm-eval glue: ``hf_ar``, lm-eval's own ``hf`` model for autoregressive baselines on our dLLM tasks.

    lm_eval --model hf_ar --model_args pretrained=Qwen/Qwen2.5-7B-Instruct,stats_path=ar.jsonl \\
        --tasks tiny_gsm --include_path task_configs --apply_chat_template

It is lm-eval's ``HFLM`` (``transformers.generate``, greedy, its KV cache), changed in two places only:

1. Our task YAMLs carry dLLM decoding settings in ``generation_kwargs`` (``gen_length``, ``block_length``,
   ``logits_eos_inf``, ...). ``HFLM`` would hand them to ``transformers.generate``, which rejects them. This model
   drops exactly the names our own parameter registry accepts for some strategy or cache
   (:func:`dllm_generation_keys`) and that ``transformers.GenerationConfig`` does not know, so ``temperature``,
   ``top_p`` and ``top_k`` keep their meaning and a typo still fails loudly. ``gen_length``, when the task gives
   it, is the generation budget (as for ``--model dllm``, where it wins over ``max_gen_toks``), so both models
   get the same number of tokens. Prompts are untouched: lm-eval builds them before any model sees them.
2. ``HFLM`` records no timing. Each ``generate`` call is timed (device synchronised) and every request gets the
   statistics ``--model dllm`` writes (``lmeval_dllm.stats``): ``answer_tokens`` = generated tokens before the
   first EOS / end-of-turn / padding token, ``nfe`` = forward passes while the request was still generating
   (its answer tokens plus the one that produced its stop token), ``tokens_per_s`` = answer tokens over
   generation wall time. They go to ``stats_path`` and, aggregated, to the results JSON under
   ``config.dllm_stats``, exactly where ``dllm`` puts them.
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from typing import Optional

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lmeval_dllm.stats import RequestStats, StatsLog, StatsReporting

eval_logger = logging.getLogger("lm_eval.models.hf_ar")


@lru_cache(maxsize=1)
def dllm_generation_keys() -> frozenset[str]:
    """Generation-kwarg names that only ``--model dllm`` understands: every decoding parameter of the loop, the
    proposal, each registered strategy and each registered cache, minus the names ``transformers.generate``
    itself takes (``temperature``, ``top_p``, ``top_k``)."""
    from transformers import GenerationConfig

    from lmeval_dllm.decoding import all_decoding_keys

    names = all_decoding_keys()
    return frozenset(names - set(GenerationConfig().to_dict()))


@register_model("hf_ar")
class TimedHFLM(StatsReporting, HFLM):
    """lm-eval's ``hf`` model that ignores dLLM decoding keys and records our decoding statistics.

    Model arguments: those of lm-eval's ``hf`` model, plus ``stats_path`` (per-request statistics as JSON lines).
    """

    def __init__(self, *args, stats_path: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        launched = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate launch / torchrun
        if launched > 1 and self.world_size == 1:
            # HFLM shards documents only when it sees more than one GPU; otherwise every process would evaluate
            # every document and all of them would write the same output files.
            raise ValueError(
                f"hf_ar was launched as {launched} processes, but lm-eval's hf model runs data-parallel only across "
                f"GPUs (found {torch.cuda.device_count()}), so every process would evaluate every document; run it "
                f"as one process (num_processes: 1 / --num_processes 1) or on {launched} GPUs"
            )
        self.stats_path = stats_path
        self.stats = StatsLog()
        self._merged_stats: Optional[StatsLog] = None
        self._dropped_logged: set[str] = set()

    # ------------------------------------------------------------------------------------------------------------
    # Generation: dLLM keys out, timing in

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        budget = generation_kwargs.pop("gen_length", None)
        dropped = sorted(k for k in generation_kwargs if k in dllm_generation_keys())
        for k in dropped:
            generation_kwargs.pop(k)
        if budget is not None:
            max_length = context.shape[1] + int(budget)
        self._log_dropped(dropped, budget)

        self._synchronize()
        start = time.perf_counter()
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._synchronize()
        elapsed = time.perf_counter() - start
        self._record(context, generation_kwargs.get("attention_mask"), out, max_length, elapsed)
        return out

    def _record(self, context: torch.Tensor, attention_mask, out: torch.Tensor, max_length: int,
                elapsed: float) -> None:
        gen = out[:, context.shape[1]:]  # (B, N): generated ids, padding after a finished row
        stop_ids = torch.tensor(sorted(self._stop_ids()), dtype=torch.long, device=gen.device)
        is_stop = torch.isin(gen, stop_ids)  # (B, N)
        width = gen.shape[1]
        answer = torch.where(is_stop.any(-1), is_stop.int().argmax(-1), width)  # (B,) tokens before the stop
        nfe = torch.clamp(answer + 1, max=width)  # the stop token took a forward pass too
        prompt = (attention_mask.sum(-1) if attention_mask is not None
                  else torch.full((gen.shape[0],), context.shape[1]))
        rows = [RequestStats(prompt_tokens=int(p), gen_length=max_length - context.shape[1], nfe=int(n),
                             answer_tokens=int(a), committed_tokens=int(n), wall_time_s=elapsed,
                             batch_size=gen.shape[0])
                for p, n, a in zip(prompt.tolist(), nfe.tolist(), answer.tolist())]
        self.stats.add_batch(rows, elapsed, width)

    def _stop_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's EOS and padding, and the generation config's EOS ids
        (instruct models list their end-of-turn token there, e.g. Qwen2.5's <|im_end|>)."""
        ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
        ids.discard(None)
        return ids

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_dropped(self, dropped: list[str], budget) -> None:
        key = repr((dropped, budget))
        if (dropped or budget is not None) and key not in self._dropped_logged:
            self._dropped_logged.add(key)
            eval_logger.info("hf_ar: dLLM decoding keys ignored: %s%s", ", ".join(dropped) or "(none)",
                             f"; gen_length={budget} is the generation budget" if budget is not None else "")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._log_stats(eval_logger, "hf_ar")
        return out

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), **self.stats_info()}
