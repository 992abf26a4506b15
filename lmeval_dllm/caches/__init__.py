"""Approximate KV caches, by the names researchers use (``cache=<name>``)."""

from __future__ import annotations

from typing import Any, Optional

from lmeval_dllm.caches.base import Cache
from lmeval_dllm.params import coerce_kwargs, did_you_mean, keyword_params

CACHES: dict[str, type[Cache]] = {}  # name -> class; "none" (or no cache argument) is the exact computation


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
    return keyword_params(cache_class(name).__init__)


def build_cache(name: Optional[str], **kwargs: Any) -> Cache:
    cls = cache_class(name)
    return cls(**coerce_kwargs(cls.__init__, kwargs, f"cache {name!r}"))


__all__ = ["CACHES", "Cache", "build_cache", "cache_class", "cache_params"]
