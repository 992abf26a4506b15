"""Fast-dLLM's dual cache (Wu et al., "Fast-dLLM", arXiv:2505.22618, §3.2, "DualCache"; NVlabs/Fast-dLLM
``llada/generate.py::generate_with_dual_cache``).

Like the prefix cache, but the suffix (the masked blocks right of the current one) is cached too: after the
block's first step, which runs the whole canvas, only the block's rows run, against the cached prefix *and*
suffix K/V. Per step that is ``block_length`` rows (Dream: one more, the row left of the block that predicts
its first column; its own K/V are refreshed with the block's, so a just-committed token's key is always
current) whatever the prompt and generation lengths.
"""

from __future__ import annotations

from lmeval_dllm.caches.prefix import PrefixCache
from lmeval_dllm.models import DiffusionLM
from lmeval_dllm.state import DecodeState


class DualCache(PrefixCache):
    """K/V of every position from the block's first step; later steps rerun only the block.

    Args:
        refresh_interval: rerun the whole canvas every ``refresh_interval`` steps inside a block (the block's
            first step always does). None (default): only at block starts, as Fast-dLLM.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).
    """

    name = "dual"
    keeps_cached_keys_on_resize = False  # cached suffix keys sit at shifted positions after an insertion
    block_dependent_shapes = False  # the block has the same length everywhere: one graph serves all blocks

    def query_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        return state.block.start - model.logit_shift, state.block.stop
