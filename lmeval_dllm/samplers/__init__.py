"""Decoding strategies, by the names researchers use (``strategy=<name>``).

One file per paper; each class takes its parameters as typed keyword arguments (see ``params.py``).
"""

from __future__ import annotations

from typing import Any

from lmeval_dllm.params import coerce_kwargs, did_you_mean, keyword_params
from lmeval_dllm.samplers.ar import LeftToRightSampler
from lmeval_dllm.samplers.base import Sampler
from lmeval_dllm.samplers.credit import CreditSampler
from lmeval_dllm.samplers.d3llm import D3LLMSampler
from lmeval_dllm.samplers.eb_sampler import EntropyBoundSampler
from lmeval_dllm.samplers.hierarchy import HierarchySampler
from lmeval_dllm.samplers.klass import KLAdaptiveStabilitySampler
from lmeval_dllm.samplers.llada21_edit import LLaDA21EditSampler
from lmeval_dllm.samplers.pc_sampler import PCSampler
from lmeval_dllm.samplers.daedal import DaedalSampler
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.prophet import ProphetSampler
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler
from lmeval_dllm.samplers.wino import WinoSampler
from lmeval_dllm.state import DecodeState, StepOutput

SAMPLERS: dict[str, type[Sampler]] = {
    "vanilla": LowConfidenceSampler,  # LLaDA low-confidence remasking + Fast-dLLM threshold / factor
    "pc_sampler": PCSampler,  # PC-Sampler: position-aware weighting + frequency-calibrated confidence
    "eb_sampler": EntropyBoundSampler,  # EB-Sampler: entropy-bounded number of tokens per step
    "klass": KLAdaptiveStabilitySampler,  # KLASS: commit positions whose distribution is stable and confident
    "ar": LeftToRightSampler,  # left-to-right order inside the dLLM (baseline)
    "wino": WinoSampler,  # WINO: wide-in drafting, narrow-out re-masking (arXiv:2507.18578)
    "daedal": DaedalSampler,  # DAEDAL: variable-length denoising (arXiv:2508.00819)
    "hierarchy": HierarchySampler,  # dInfer hierarchical decoding: each masked run's best (arXiv:2510.08666)
    "credit": CreditSampler,  # dInfer credit decoding: EMA credit of top-1 tokens fused into the logits
    "prophet": ProphetSampler,  # Prophet: commit every mask once the answer's top-2 gap clears a phase threshold
    "d3llm": D3LLMSampler,  # d3LLM: several blocks in flight, entropy-threshold commits (arXiv:2601.07568)
    "llada21_edit": LLaDA21EditSampler,  # LLaDA2.1: threshold commits plus token-to-token edits (arXiv:2602.08676)
}


def sampler_class(name: str) -> type[Sampler]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}{did_you_mean(name, SAMPLERS)} available: {', '.join(SAMPLERS)}"
        ) from None


def sampler_params(name: str) -> dict[str, tuple[Any, Any]]:
    """{parameter: (type, default)} that strategy ``name`` accepts (besides the proposal parameters)."""
    return keyword_params(sampler_class(name).__init__)


def build_sampler(name: str, proposal: Proposal, **kwargs: Any) -> Sampler:
    cls = sampler_class(name)
    return cls(proposal, **coerce_kwargs(cls.__init__, kwargs, f"strategy {name!r}"))


__all__ = ["SAMPLERS", "DecodeState", "Proposal", "Sampler", "StepOutput", "build_sampler", "sampler_class",
           "sampler_params"]
