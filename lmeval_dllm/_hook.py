"""Registers ``--model dllm`` with lm-eval lazily, without lm-eval knowing about us.

lm-eval (0.4.x) discovers no plugins: a model is found only if something imported its module before the
registry is queried. The installed ``lmeval_dllm_hook.pth`` runs ``import lmeval_dllm._hook`` at interpreter
start. That import costs microseconds: it puts one finder on ``sys.meta_path`` and imports nothing else.
When (and only when) ``lm_eval.api.registry`` is imported, the finder lets the real module load and then adds
a *lazy* entry ``dllm -> lmeval_dllm.lm:DLLM``. torch and our code are imported only if ``dllm`` is used.
"""

from __future__ import annotations

import importlib.machinery
import sys

_TARGET = "lm_eval.api.registry"
MODEL_NAME = "dllm"
MODEL_PATH = "lmeval_dllm.lm:DLLM"


def register(registry_module) -> None:
    """Add the lazy ``dllm`` entry to lm-eval's model registry (idempotent)."""
    model_registry = getattr(registry_module, "model_registry", None)
    if model_registry is not None:
        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=MODEL_PATH)
    else:  # lm-eval < 0.4.10 keeps a plain dict
        registry_module.MODEL_REGISTRY.setdefault(MODEL_NAME, _load_class())


def _load_class():
    from lmeval_dllm.lm import DLLM

    return DLLM


# Plain classes, not importlib.abc subclasses: importing importlib.abc pulls in importlib.resources, pathlib,
# tempfile, re... (~50 ms at every interpreter start). The import system only needs the methods.
class _Loader:
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        register(module)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules:  # lm-eval was imported before us: register directly
        register(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
