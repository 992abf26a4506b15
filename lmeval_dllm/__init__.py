"""lmeval-dllm: evaluate diffusion LLMs (LLaDA, Dream) in lm-evaluation-harness under every published
training-free decoding strategy and approximate KV cache.

Importing this package is cheap (no torch). ``import lmeval_dllm`` also makes sure ``--model dllm`` is
registered with lm-eval, for environments where the installed ``.pth`` hook is not processed.
"""

from lmeval_dllm import _hook  # noqa: F401  (registers `dllm` with lm-eval, lazily)

__version__ = "0.1.0"

__all__ = ["__version__"]
