"""Approximate KV caches, by the names researchers use (``cache=<name>``)."""

from __future__ import annotations

from typing import Any, Optional

from lmeval_dllm.caches.base import ENGINE_OPTIONS, FEATURES, Cache, check_compatible
from lmeval_dllm.caches.block import BlockCache
from lmeval_dllm.caches.d2cache import D2Cache
from lmeval_dllm.caches.dkv import DKVCache
from lmeval_dllm.caches.dllm_cache import DLLMCache
from lmeval_dllm.caches.dual import DualCache
from lmeval_dllm.caches.elastic import ElasticCache
from lmeval_dllm.caches.prefix import PrefixCache
from lmeval_dllm.caches.sparse import SparseCache
from lmeval_dllm.caches.vicinity import VicinityCache
from lmeval_dllm.params import coerce_kwargs, did_you_mean, keyword_params
from lmeval_dllm.state import ExtraRows

# name -> class; "none" (or no cache argument) is the exact computation
CACHES: dict[str, type[Cache]] = {
    "prefix": PrefixCache,  # Fast-dLLM prefix cache (arXiv:2505.22618)
    "dual": DualCache,  # Fast-dLLM dual cache (arXiv:2505.22618)
    "dllm": DLLMCache,  # dLLM-Cache (arXiv:2506.06295)
    "d2cache": D2Cache,  # d2Cache (arXiv:2509.23094)
    "vicinity": VicinityCache,  # dInfer vicinity refresh: a dual cache rerunning a window around the block
    "block": BlockCache,  # block diffusion's exact KV cache of finished blocks (SDAR arXiv:2510.06303)
    "sparse": SparseCache,  # Sparse-dLLM (arXiv:2508.02558): attention-selected prefix/suffix K/V
    "elastic": ElasticCache,  # Elastic-Cache (arXiv:2510.14973)
    "dkv": DKVCache,  # dKV-Cache (arXiv:2505.15781): decoded tokens' K/V cached one step late
}


def cache_class(name: Optional[str]) -> type[Cache]:
    if name is None or name == "none":
        return Cache
    try:
        return CACHES[name]
    except KeyError:
        raise ValueError(
            f"unknown cache {name!r}{did_you_mean(name, CACHES)} available: {', '.join(['none', *CACHES])}"
        ) from None


def cache_params(name: Optional[str]) -> dict[str, tuple[Any, Any]]:
    """{parameter: (type, default)} of the method (engine options such as ``cuda_graphs`` are not among them)."""
    return {k: v for k, v in keyword_params(cache_class(name).__init__).items() if k not in ENGINE_OPTIONS}


def build_cache(name: Optional[str], *, cuda_graphs: bool = True, **kwargs: Any) -> Cache:
    """The cache ``name`` with its method parameters ``kwargs`` (validated, coerced); ``cuda_graphs``: replay
    steps as CUDA graphs (an engine option)."""
    cls = cache_class(name)
    return cls(cuda_graphs=cuda_graphs, **coerce_kwargs(cls.__init__, kwargs, f"cache {name!r}", cache_params(name)))


__all__ = ["CACHES", "ENGINE_OPTIONS", "FEATURES", "Cache", "ExtraRows", "build_cache", "cache_class", "cache_params",
           "check_compatible"]
